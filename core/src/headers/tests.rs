use super::*;

#[test]
fn many_headers_keep_insert_semantics_past_the_filter() {
    let limits = HeaderLimits {
        max_count: 4096,
        max_bytes: 1 << 20,
    };
    let mut h = Headers::with_limits(limits);
    for i in 0..4096 {
        h.insert(format!("x-h-{i}"), "a").unwrap();
    }
    assert_eq!(h.len(), 4096);
    // A name already there, in another case, replaces it rather than adding one.
    assert_eq!(
        h.insert("X-H-17", "b")
            .unwrap()
            .and_then(|v| v.as_str().map(str::to_owned)),
        Some("a".to_owned())
    );
    assert_eq!(h.len(), 4096);
    assert_eq!(h.get_str("x-h-17"), Some("b"));
    // Removed, then added again: found through the scan.
    h.remove("x-h-18");
    h.insert("x-h-18", "c").unwrap();
    h.insert("x-h-18", "d").unwrap();
    assert_eq!(h.get_all("x-h-18").count(), 1);
    assert!(
        h.insert("one-too-many", "x").is_err(),
        "the count limit holds"
    );
    // Equality ignores the filter.
    let mut small = Headers::with_limits(limits);
    let mut big = Headers::with_limits(limits);
    for i in 0..40 {
        big.insert(format!("n{i}"), "v").unwrap();
    }
    for i in 0..40 {
        big.remove(&format!("n{i}"));
    }
    small.insert("k", "v").unwrap();
    big.insert("k", "v").unwrap();
    assert_eq!(small, big);
}

#[test]
fn a_static_name_is_one_header_with_its_owned_spelling() {
    let mut h = Headers::new();
    h.insert("Correlation-Id", "a").unwrap();
    let old = h.insert_static("correlation-id", "b").unwrap();
    assert_eq!(old, Some(HeaderValue::from("a")));
    assert_eq!(h.len(), 1);
    assert_eq!(h.iter().next().unwrap().0, "correlation-id");
    assert_eq!(h.size(), "correlation-id".len() + 1);
    let tight = HeaderLimits {
        max_count: 1,
        ..HeaderLimits::default()
    };
    let mut h = Headers::with_limits(tight);
    h.insert_static("x", "1").unwrap();
    assert!(
        h.clone().append("y", "2").is_err(),
        "limits hold for static names"
    );
    assert_eq!(
        h.insert_static("X", "2").unwrap(),
        Some(HeaderValue::from("1"))
    );
}

#[test]
fn names_are_case_insensitive_and_keep_their_case() {
    let mut h = Headers::new();
    h.insert("Trace-Id", "1").unwrap();
    assert_eq!(h.get_str("trace-id"), Some("1"));
    assert_eq!(h.iter().next().unwrap().0, "Trace-Id");
    let old = h.insert("TRACE-ID", "2").unwrap();
    assert_eq!(old, Some(HeaderValue::from("1")));
    assert_eq!(h.len(), 1);
    assert_eq!(h.get_str("Trace-Id"), Some("2"));
}

#[test]
fn order_is_kept_and_insert_replaces_all_duplicates() {
    let mut h = Headers::new();
    h.append("a", "1").unwrap();
    h.append("b", "2").unwrap();
    h.append("A", "3").unwrap();
    assert_eq!(h.get_all("a").count(), 2);
    h.insert("a", "4").unwrap();
    let names: Vec<_> = h.iter().map(|(n, v)| (n, v.as_str().unwrap())).collect();
    assert_eq!(names, vec![("a", "4"), ("b", "2")]);
    assert_eq!(h.size(), 4);
}

#[test]
fn count_limit_is_a_clear_error_and_leaves_headers_unchanged() {
    let mut h = Headers::with_limits(HeaderLimits {
        max_count: 2,
        max_bytes: 1024,
    });
    h.insert("a", "1").unwrap();
    h.insert("b", "2").unwrap();
    let err = h.insert("c", "3").unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot add header `c`: a message may carry at most 2 headers"
    );
    assert_eq!(h.len(), 2);
    // Replacing an existing header does not count as adding one.
    h.insert("a", "9").unwrap();
}

#[test]
fn size_limit_counts_names_and_values() {
    let mut h = Headers::with_limits(HeaderLimits {
        max_count: 10,
        max_bytes: 8,
    });
    h.insert("ab", "cdef").unwrap();
    let err = h.append("x", vec![0u8; 2]).unwrap_err();
    assert!(
        matches!(
            err,
            HeaderError::TooLarge {
                size: 9,
                limit: 8,
                ..
            }
        ),
        "{err}"
    );
    h.insert("ab", "cdefgh").unwrap();
    assert_eq!(h.size(), 8);
    assert!(h.insert("", "x").is_err());
}

#[test]
fn empty_headers_hold_nothing_and_equal_emptied_ones() {
    let empty = Headers::new();
    assert!(
        empty.entries.is_unallocated(),
        "no allocation until the first header"
    );
    let mut emptied = Headers::new();
    emptied.insert("x", "1").unwrap();
    assert_ne!(emptied, empty);
    emptied.remove("x");
    assert_eq!(emptied, empty);
    assert_eq!(emptied.size(), 0);
}

#[test]
fn clones_share_entries_until_changed() {
    let mut a = Headers::new();
    a.insert("x", "1").unwrap();
    let mut b = a.clone();
    assert!(a.entries.shares_with(&b.entries));
    b.insert("y", "2").unwrap();
    assert_eq!((a.len(), b.len()), (1, 2));
    b.remove("x");
    assert_eq!(a.get_str("x"), Some("1"));
    assert_eq!((b.get_str("x"), b.size()), (None, 2));
}

#[test]
fn byte_values_are_kept_and_read_as_str_when_utf8() {
    let mut h = Headers::new();
    h.insert("bin", vec![0xff, 0x00]).unwrap();
    h.insert("txt", Bytes::from_static(b"ok")).unwrap();
    assert_eq!(h.get("bin").unwrap().as_bytes(), &[0xff, 0x00]);
    assert_eq!(h.get_str("bin"), None);
    assert_eq!(h.get_str("txt"), Some("ok"));
    assert_eq!(h.remove("BIN").unwrap().len(), 2);
    assert_eq!(h.size(), 5);
}
