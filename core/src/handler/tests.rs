use super::*;
use crate::classify::Classifier;
use tower::ServiceExt;

#[cfg(feature = "json")]
#[derive(serde::Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
}

#[tokio::test]
async fn handler_fn_maps_unit_to_processed() {
    let svc = handler_fn(|_m: Message| async { Ok::<_, std::io::Error>(()) });
    assert_eq!(
        svc.oneshot(Message::new("x")).await.unwrap(),
        Outcome::Processed
    );
}

#[tokio::test]
#[cfg(feature = "json")]
async fn json_decodes_and_passes_the_message() {
    let svc = json(|o: Order, m: Message| async move {
        assert_eq!(o, Order { id: 7 });
        assert_eq!(m.key.as_deref(), Some(&b"k"[..]));
        Ok::<_, BoxError>(Outcome::Processed)
    });
    let msg = Message::new(r#"{"id":7}"#).with_key("k");
    assert_eq!(svc.oneshot(msg).await.unwrap(), Outcome::Processed);
}

#[tokio::test]
async fn a_handler_that_panics_returns_a_transient_panicked_error() {
    let svc = handler_fn(|m: Message| async move {
        assert!(m.payload.is_empty(), "payload {:?}", m.payload);
        Ok::<_, BoxError>(())
    });
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    let p = err.downcast_ref::<Panicked>().expect("a Panicked error");
    assert!(p.message().contains("payload"), "{p}");
    assert!(!Classifier::default().classify(&*err).is_permanent());
}

#[tokio::test]
#[allow(clippy::diverging_sub_expression, reason = "the panic is the point")]
async fn a_panic_before_the_handler_future_is_made_is_caught_too() {
    let svc = handler_fn(|_m: Message| -> std::future::Ready<Result<(), BoxError>> {
        panic!("before the future")
    });
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert!(err.is::<Panicked>(), "{err}");
}

#[tokio::test]
async fn a_panic_message_is_bounded() {
    let long = "x".repeat(10_000);
    let p = Panicked::from_payload(Box::new(long));
    assert!(p.message().len() <= Panicked::MAX_MESSAGE_LEN);
}

#[tokio::test]
async fn a_decoder_that_panics_gives_a_permanent_decode_error() {
    struct Explosive;
    impl Decode<u8> for Explosive {
        const FORMAT: &'static str = "explosive";
        fn decode(_: &[u8]) -> Result<u8, BoxError> {
            panic!("decoder bug")
        }
    }
    let svc = typed::<Explosive, u8, _, _>(|_v: u8, _m: Message| async { Ok::<_, BoxError>(()) });
    let err = svc.oneshot(Message::new("x")).await.unwrap_err();
    assert!(Classifier::default().classify(&*err).is_permanent());
    assert!(err.to_string().contains("decoder bug"), "{err}");
}

#[tokio::test]
#[cfg(feature = "json")]
async fn bad_json_is_permanent_and_names_the_type() {
    let svc = json(|_o: Order, _m: Message| async { Ok::<_, BoxError>(()) });
    let err = svc.oneshot(Message::new("{nope")).await.unwrap_err();
    assert!(Classifier::default().classify(&*err).is_permanent());
    let text = err.to_string();
    assert!(text.contains("not valid JSON"), "{text}");
    assert!(text.contains("Order"), "{text}");
    assert!(text.contains("key must be a string"), "{text}");
}
