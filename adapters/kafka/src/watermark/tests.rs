use futures_util::FutureExt as _;

use super::partition::Open;
use super::*;

/// The offsets `take_dirty` gives, without their metadata.
fn dirty(w: &mut Watermarks) -> Vec<(Tp, i64)> {
    w.take_dirty()
        .into_iter()
        .map(|c| (c.tp, c.offset))
        .collect()
}

/// The metadata of the partition's next commit.
fn metadata(w: &mut Watermarks, p: i32) -> Option<String> {
    w.take_dirty()
        .into_iter()
        .find(|c| c.tp == tp(p))
        .map(|c| c.metadata)
}

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
    assert_eq!(dirty(&mut w), vec![(tp(0), 14)]);
    assert_eq!(dirty(&mut w), vec![], "taken once");
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
    assert_eq!(dirty(&mut w), vec![(tp(0), 3)]);
    assert_eq!(dirty(&mut w), vec![]);
    a.forget_committed();
    assert_eq!(dirty(&mut w), vec![(tp(0), 3)], "committed again");
}

#[test]
fn the_first_record_and_counted_ones_carry_their_counts() {
    let kept = |m: &str| Kept::parse(5, m).expect("redrive's");
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.set_kept(kept("redrive:a=5:2,9:1"));
    assert_eq!(a.earlier_deliveries(5), Some(2), "the counted record");
    assert_eq!(a.earlier_deliveries(6), None, "only the first record");
    assert_eq!(a.earlier_deliveries(9), Some(1), "a later counted record");
    let b = w.assign(tp(1));
    b.set_kept(kept("redrive:a=5:2"));
    assert_eq!(
        b.earlier_deliveries(7),
        Some(0),
        "a count for another record"
    );
    let c = w.assign(tp(2));
    assert_eq!(c.earlier_deliveries(0), Some(0), "no count committed");
}

#[test]
fn completions_past_a_stuck_record_are_committed_in_its_metadata() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.received(&(100..=10_100).collect::<Vec<_>>());
    for o in 101..=10_100 {
        assert!(!a.complete(o));
    }
    assert_eq!(
        w.take_dirty(),
        vec![Commit {
            tp: tp(0),
            offset: 100,
            metadata: "redrive:d=1.10000".into()
        }],
        "committed at the stuck record, with the rest kept"
    );
    assert_eq!(dirty(&mut w), vec![], "nothing changed since");
    assert!(a.delivered(100, 2));
    assert_eq!(
        metadata(&mut w, 0).as_deref(),
        Some("redrive:a=100:2;d=1.10000")
    );
    assert!(a.complete(100));
    assert_eq!(
        w.take_dirty(),
        vec![Commit {
            tp: tp(0),
            offset: 10_101,
            metadata: String::new()
        }],
        "all done: nothing kept"
    );
}

#[test]
fn records_kept_as_completed_are_skipped_and_complete_on_arrival() {
    let mut w = Watermarks::default();
    let a = w.assign(tp(0));
    a.set_kept(Kept::parse(100, "redrive:a=100:2;d=1.4.3.2").expect("redrive's"));
    // 101..=104 and 108..=109 completed before.
    let skipped: Vec<i64> = (100..=110).filter(|o| a.skip(*o)).collect();
    assert_eq!(skipped, vec![101, 102, 103, 104, 108, 109]);
    assert_eq!(w.backlog()[0].skipped, 6);
    a.received(&(100..=106).collect::<Vec<_>>());
    assert_eq!(
        metadata(&mut w, 0),
        None,
        "receiving what was kept changes nothing"
    );
    assert!(!a.complete(106));
    assert_eq!(
        metadata(&mut w, 0).as_deref(),
        Some("redrive:a=100:2;d=1.4.1.1.1.2"),
        "the count of 100 came with it; 108..=109 are kept though not received yet"
    );
    assert!(a.complete(100));
    assert_eq!(a.watermark(), Some(105), "the skipped ones are behind it");
    assert!(a.complete(105));
    a.received(&[107, 108, 109, 110]);
    assert!(a.complete(107));
    assert_eq!(a.watermark(), Some(110), "108..=109 arrived complete");
}

#[test]
fn too_many_runs_of_completed_records_fill_a_partition() {
    let mut w = Watermarks::new(100_000);
    let wake = w.wake();
    let a = w.assign(tp(0));
    a.received(&(0..300).collect::<Vec<_>>());
    for o in (1..300).step_by(2).take(MAX_RUNS) {
        a.complete(o);
    }
    assert_eq!(w.backlog()[0].runs, MAX_RUNS);
    assert_eq!(a.room(), 0, "no room at the bound of runs");
    assert_eq!(a.received(&[300]), 0);
    assert!(a.is_full());
    // Completing the records between the runs merges them.
    for o in (2..300).step_by(2).take(MAX_RUNS / 2 - 1) {
        a.complete(o);
    }
    assert!(a.is_full(), "{} runs", w.backlog()[0].runs);
    a.complete(2 * (MAX_RUNS as i64 / 2));
    assert!(!a.is_full(), "down to half the runs");
    assert!(
        wake.notified().now_or_never().is_some(),
        "the poll task is woken"
    );
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
        dirty(&mut w),
        vec![],
        "the old assignment's ack is not committed"
    );
    assert!(new.complete(0));
    assert_eq!(dirty(&mut w), vec![(tp(1), 1)]);
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
    let taken = w.take_dirty();
    assert_eq!(dirty(&mut w), vec![]);
    w.commit_failed(taken.iter().map(|c| (&c.tp, c.offset)));
    assert_eq!(w.take_dirty(), taken);
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
    assert_eq!(w.revoke(&tp(0)).map(|c| c.offset), Some(1));
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

#[test]
fn without_the_runs_bound_a_partition_reads_on() {
    let mut w = Watermarks::new(100_000).without_runs_bound();
    let a = w.assign(tp(0));
    a.received(&(0..4000).collect::<Vec<_>>());
    for o in (1..4000).step_by(2) {
        a.complete(o);
    }
    assert_eq!(w.backlog()[0].runs, 2000);
    assert!(a.received(&[4000]) > 0 && !a.is_full());
    let commit = w.take_dirty().pop().expect("a commit");
    assert!(commit.metadata.len() <= 4000);
    let kept = Kept::parse(0, &commit.metadata).expect("redrive's");
    assert!(
        kept.done.len() > 128 && kept.done.len() < 2000,
        "the runs that fit: {}",
        kept.done.len()
    );
    assert_eq!(kept.done[0], (1, 1));
}

mod model {
    use proptest::prelude::*;

    use super::super::metadata::Kept;
    use super::*;

    proptest! {
        /// Whatever completes in whatever order, the runs counted as they change are
        /// the runs there are, the metadata keeps exactly the completed records past
        /// the watermark, and a new assignment reading it skips exactly those.
        #[test]
        fn the_metadata_keeps_exactly_what_completed_past_the_watermark(
            n in 1usize..300,
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..300),
        ) {
            let mut w = Watermarks::default();
            let a = w.assign(tp(0));
            a.received(&(0..n as i64).collect::<Vec<_>>());
            let mut done = vec![false; n];
            for i in order {
                let o = i.index(n);
                a.complete(o as i64);
                done[o] = true;
            }
            let watermark = done.iter().position(|d| !d).unwrap_or(n) as i64;
            let past: Vec<i64> = (watermark..n as i64).filter(|o| done[*o as usize]).collect();
            let runs = (watermark as usize..n)
                .filter(|&o| done[o] && (o == 0 || !done[o - 1]))
                .count();
            prop_assert_eq!(w.backlog()[0].runs, runs);
            let commit = w.take_dirty().pop();
            let Some(commit) = commit else {
                prop_assert!(past.is_empty() && watermark == 0);
                return Ok(());
            };
            prop_assert_eq!(commit.offset, watermark);
            let kept = Kept::parse(commit.offset, &commit.metadata).unwrap_or_default();
            let next = w.assign(tp(0));
            next.set_kept(kept);
            let skipped: Vec<i64> = (watermark..n as i64).filter(|o| next.skip(*o)).collect();
            prop_assert_eq!(skipped, past);
        }
    }
}
