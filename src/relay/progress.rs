//! How far the relay's work is durable: the records handed to the producer, each tagged with
//! the end of its transaction, in order, and the position up to which the broker has
//! acknowledged everything. Pure: the acknowledgements are whatever `F` is (delivery futures in
//! the relay, plain values in the tests).
//!
//! Received versus durable: a transaction is received when its commit arrives and its records
//! are queued; it is durable once the broker acknowledged its last record and every record
//! before it. Only the durable position is ever reported to Postgres, so a crash loses nothing.

use std::collections::VecDeque;

use super::lsn::Lsn;

/// Records awaiting acknowledgement, and the durable position they hold back.
#[derive(Debug)]
pub struct Progress<F> {
    waiting: VecDeque<(F, Lsn)>,
    /// The end of the last transaction received whole (or a keepalive's position past it).
    received: Lsn,
    /// Everything before this is acknowledged.
    durable: Lsn,
}

impl<F> Progress<F> {
    /// Nothing in flight; everything before `confirmed` is already durable.
    pub fn new(confirmed: Lsn) -> Self {
        Progress {
            waiting: VecDeque::new(),
            received: confirmed,
            durable: confirmed,
        }
    }

    /// A record of the transaction ending at `tx_end` was handed to the producer.
    pub fn push(&mut self, ack: F, tx_end: Lsn) {
        self.waiting.push_back((ack, tx_end));
    }

    /// The transaction ending at `tx_end` has been received whole (its records, if any, were
    /// pushed before this).
    pub fn received(&mut self, tx_end: Lsn) {
        self.received = self.received.max(tx_end);
        self.settle();
    }

    /// The server says every transaction before `position` has been sent, and none is open
    /// here: once the records in flight are acknowledged, the slot may move to `position`
    /// (the heartbeat that lets an idle outbox on a busy server advance).
    pub fn caught_up(&mut self, position: Lsn) {
        self.received(position);
    }

    /// The oldest record in flight, to wait for its acknowledgement.
    pub fn oldest(&mut self) -> Option<&mut F> {
        self.waiting.front_mut().map(|(f, _)| f)
    }

    /// The oldest record was acknowledged.
    pub fn acknowledged(&mut self) {
        if let Some((_, tx_end)) = self.waiting.pop_front() {
            // Its transaction is durable once no later record of it is still waiting and it
            // was received whole (a full producer queue makes the relay wait for an
            // acknowledgement in the middle of a transaction, before its last rows are pushed);
            // every earlier transaction was acknowledged before it.
            if self.waiting.front().is_none_or(|(_, next)| *next != tx_end) {
                self.durable = self.durable.max(tx_end.min(self.received));
            }
        }
        self.settle();
    }

    fn settle(&mut self) {
        if self.waiting.is_empty() {
            self.durable = self.durable.max(self.received);
        }
    }

    /// Everything before this is acknowledged by the broker.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Records in flight.
    pub fn in_flight(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_durable_only_when_its_last_record_is_acknowledged() {
        let mut p = Progress::new(Lsn(10));
        // Transaction ending at 20 with three records, then one ending at 30 with one.
        for _ in 0..3 {
            p.push((), Lsn(20));
        }
        p.received(Lsn(20));
        p.push((), Lsn(30));
        p.received(Lsn(30));
        assert_eq!(p.durable(), Lsn(10));
        p.acknowledged();
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(10), "one record of 20 still waits");
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(20));
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(30));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_transaction_acknowledged_before_its_last_row_is_queued_is_not_durable() {
        // A full producer queue: the first row's acknowledgement is awaited before the second
        // row of the same transaction is handed over.
        let mut p = Progress::new(Lsn(10));
        p.push((), Lsn(20));
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(10), "the second row is not even queued");
        p.push((), Lsn(20));
        p.received(Lsn(20));
        assert_eq!(p.durable(), Lsn(10), "the second row is not acknowledged");
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(20));
    }

    #[test]
    fn a_keepalive_moves_durable_only_past_acknowledged_work() {
        let mut p = Progress::new(Lsn(10));
        p.push((), Lsn(20));
        p.received(Lsn(20));
        p.caught_up(Lsn(50));
        assert_eq!(p.durable(), Lsn(10), "the record of 20 is not acknowledged");
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(50), "then the keepalive's position holds");
        // Nothing in flight: a keepalive counts at once; an older one never moves back.
        p.caught_up(Lsn(60));
        assert_eq!(p.durable(), Lsn(60));
        p.caught_up(Lsn(40));
        assert_eq!(p.durable(), Lsn(60));
    }

    #[test]
    fn a_transaction_without_records_is_progress() {
        let mut p: Progress<()> = Progress::new(Lsn(10));
        p.received(Lsn(15));
        assert_eq!(p.durable(), Lsn(15));
    }

    #[test]
    fn acknowledging_with_nothing_in_flight_changes_nothing() {
        let mut p: Progress<()> = Progress::new(Lsn(10));
        p.acknowledged();
        assert_eq!(p.durable(), Lsn(10));
        assert!(p.oldest().is_none());
    }

    #[test]
    fn durable_never_moves_backwards_whatever_the_order_of_calls() {
        // Every interleaving of pushes, receipts and acknowledgements over a small script.
        for script in 0u32..4096 {
            let mut p = Progress::new(Lsn(0));
            let (mut next_tx, mut last) = (1u64, Lsn(0));
            let mut open_records = 0;
            for step in 0..12 {
                match (script >> step) & 3 {
                    0 => {
                        p.push((), Lsn(next_tx * 10));
                        open_records += 1;
                    }
                    1 => {
                        p.received(Lsn(next_tx * 10));
                        next_tx += 1;
                        open_records = 0;
                    }
                    2 => p.acknowledged(),
                    _ => {
                        if open_records == 0 {
                            p.caught_up(Lsn(next_tx * 10 - 5));
                        }
                    }
                }
                assert!(p.durable() >= last, "script {script:b}");
                // Durable never passes a transaction not yet received whole.
                if open_records > 0 || (script >> step) & 3 == 0 {
                    assert!(p.durable() < Lsn(next_tx * 10), "script {script:b}");
                }
                // Durable never passes a record still waiting.
                if let Some((_, end)) = p.waiting.front() {
                    assert!(p.durable() < *end, "script {script:b}");
                }
                last = p.durable();
            }
        }
    }
}
