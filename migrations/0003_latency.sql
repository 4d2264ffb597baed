-- End-to-end latency, outbox to partner: when the event was written (the record's timestamp,
-- the outbox row's commit-time clock as the relay or Debezium carries it) and when the partner
-- acknowledged it (the handler returned done). `ferry verify` reports its percentiles.
ALTER TABLE deliveries
    ADD COLUMN written_at timestamptz,
    ADD COLUMN acked_at   timestamptz;
