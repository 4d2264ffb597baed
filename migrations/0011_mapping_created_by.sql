-- Which event created the partner's object a mapping names (when Ferry created it). An event
-- handled again after its settlement was lost (a crash before the batch committed) finds the
-- object it created mapped, and must not bring it back to its own, older state: the events
-- after it, handled again too, may have changed it, and their repeats are answered from the
-- partner's idempotency store without being applied again.
ALTER TABLE integration_mappings ADD COLUMN created_by uuid;
