use futures_util::FutureExt as _;

use super::*;

fn tp(p: i32) -> Tp {
    ("t".into(), p)
}

#[test]
fn advances_only_over_the_complete_run() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    for o in 10..15 {
        a.received(&[o]);
    }
    assert!(!a.complete(12));
    assert!(!a.complete(11));
    assert_eq!(a.watermark(), None, "10 holds it");
    assert!(a.complete(10));
    assert_eq!(a.watermark(), Some(13));
    assert!(a.complete(13));
    assert_eq!(a.watermark(), Some(14));
    assert_eq!(w.take_dirty(), vec![(tp(0), 14)]);
    assert_eq!(w.take_dirty(), vec![], "taken once");
}

#[test]
fn a_forgotten_commit_is_committed_again() {
    // A commit outside the rounds (past a counted record) may have moved the
    // committed offset back behind the watermark the last round committed.
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[0, 1, 2]);
    for o in [1, 2, 0] {
        a.complete(o);
    }
    assert_eq!(w.take_dirty(), vec![(tp(0), 3)]);
    assert_eq!(w.take_dirty(), vec![]);
    a.forget_committed();
    assert_eq!(w.take_dirty(), vec![(tp(0), 3)], "committed again");
}

#[test]
fn the_first_record_of_an_assignment_carries_its_count() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.set_died(5, 2);
    assert_eq!(a.first_record(5), Some(2), "the counted record");
    assert_eq!(a.first_record(6), None, "only the first record");
    let b = w.assign(tp(1));
    b.set_died(5, 2);
    assert_eq!(b.first_record(7), Some(0), "a count for another record");
    let c = w.assign(tp(2));
    assert_eq!(c.first_record(0), Some(0), "no count committed");
}

#[test]
fn gaps_in_offsets_do_not_hold_it() {
    // Compaction and transaction markers leave gaps.
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[3]);
    a.received(&[7]);
    a.complete(3);
    a.complete(7);
    assert_eq!(a.watermark(), Some(8));
    // Out of order across gaps: each record is found though its place is not its
    // distance from the oldest open one.
    a.received(&[9, 10, 20, 21, 30]);
    assert!(!a.complete(21));
    assert!(!a.complete(10));
    assert!(!a.complete(11), "never received");
    assert!(!a.complete(30));
    assert_eq!(a.watermark(), Some(8), "9 holds it");
    assert!(a.complete(9));
    assert_eq!(a.watermark(), Some(11));
    assert!(a.complete(20));
    assert_eq!(a.watermark(), Some(31));
    assert!(!a.complete(5), "behind the watermark");
}

#[test]
fn completions_from_an_earlier_assignment_are_ignored() {
    let mut w = Watermarks::default();
    assert!(w.get(&tp(1)).is_none(), "not assigned");
    let old = w.assign(tp(1));
    old.received(&[0]);
    assert_eq!(w.revoke(&tp(1)), None, "nothing completed");
    assert!(!old.is_current());
    let new = w.assign(tp(1));
    assert!(new.is_current() && !old.is_current());
    new.received(&[0]);
    old.complete(0);
    assert_eq!(
        w.take_dirty(),
        vec![],
        "the old assignment's ack is not committed"
    );
    assert!(new.complete(0));
    assert_eq!(w.take_dirty(), vec![(tp(1), 1)]);
}

#[test]
fn an_assignment_replaced_without_a_revoke_is_no_longer_current() {
    let mut w = Watermarks::default();
    let old = w.assign(tp(0));
    let new = w.assign(tp(0));
    assert!(!old.is_current() && new.is_current());
    assert!(Arc::ptr_eq(&w.get(&tp(0)).unwrap(), &new));
}

#[test]
fn a_failed_commit_is_offered_again() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[0]);
    a.complete(0);
    let dirty = w.take_dirty();
    w.commit_failed(&dirty);
    assert_eq!(w.take_dirty(), dirty);
}

#[test]
fn a_rewind_forgets_what_came_after() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[0]);
    a.received(&[1]);
    a.received(&[2]);
    a.received(&[1]); // fetched again from 1
    assert!(a.complete(0));
    assert!(!a.complete(2), "2 is not handed out again yet");
    assert!(a.complete(1));
    assert_eq!(a.watermark(), Some(2));
}

#[test]
fn running_records_are_counted_until_they_stop() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[0, 1, 2]);
    a.started();
    a.started();
    assert_eq!(w.running(&[tp(0)]), 2);
    a.stopped(); // parked
    assert_eq!(w.running(&[tp(0)]), 1);
    w.start_revoke(&tp(0));
    assert!(!a.is_current(), "not to be started while revoking");
    assert!(a.complete(0), "a running record still completes");
    a.stopped();
    assert_eq!(w.running(&[tp(0), tp(1)]), 0);
    assert_eq!(w.revoke(&tp(0)), Some(1));
}

#[test]
fn an_open_record_takes_16_bytes() {
    assert_eq!(std::mem::size_of::<Open>(), 16);
}

#[test]
fn a_partition_is_full_at_its_bound_until_down_to_half_of_it() {
    let mut w = Watermarks::new(4);
    let wake = w.wake();
    let a = w.assign(tp(0));
    assert_eq!(a.room(), 4);
    assert_eq!(a.received(&[0, 1, 2]), 1, "room for one more");
    assert!(!a.is_full());
    assert_eq!(a.received(&[3]), 0, "full");
    assert!(a.is_full());
    assert_eq!(a.stuck().map(|(o, _)| o), Some(0));
    assert!(!a.complete(1) && !a.complete(3));
    assert!(a.is_full(), "0 holds them all");
    assert!(a.complete(0), "the watermark moves past 1");
    assert_eq!(a.stuck().map(|(o, _)| o), Some(2));
    assert!(!a.is_full(), "two open: half the bound");
    assert!(
        wake.notified().now_or_never().is_some(),
        "the poll task is woken"
    );
    assert!(a.complete(2));
    assert!(
        wake.notified().now_or_never().is_none(),
        "woken once, when it stops being full"
    );
    let b = w.backlog();
    assert_eq!(
        (b[0].open, b[0].oldest_incomplete, b[0].committable),
        (0, None, Some(4))
    );
}

#[test]
fn a_full_partition_stays_full_above_half_its_bound() {
    let mut w = Watermarks::new(4);
    let a = w.assign(tp(0));
    a.received(&[0, 1, 2, 3]);
    assert!(a.complete(0), "3 open: still above half");
    assert!(a.is_full());
    let b = w.backlog();
    assert_eq!((b[0].open, b[0].oldest_incomplete), (3, Some(1)));
}

#[test]
fn a_rewind_that_forgets_records_ends_fullness() {
    let mut w = Watermarks::new(4);
    let a = w.assign(tp(0));
    a.received(&[0, 1, 2, 3]);
    assert!(a.is_full());
    assert_eq!(a.received(&[1]), 2, "fetched again from 1");
    assert!(!a.is_full());
}

#[test]
fn records_received_together_are_marked_in_order() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&[5, 6, 7]);
    a.received(&[6, 7]); // fetched again from 6
    assert!(!a.complete(7));
    assert!(a.complete(5));
    assert!(a.complete(6));
    assert_eq!(a.watermark(), Some(8));
}
