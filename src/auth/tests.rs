use http::{HeaderMap, HeaderValue};

use super::*;

/// The example from the Standard Webhooks specification's reference test vectors.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const TIMESTAMP: i64 = 1_614_265_330;
const BODY: &[u8] = br#"{"test": 2432232314}"#;
const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn signed(signature: &str, timestamp: i64) -> HeaderMap {
    headers(&[
        ("webhook-id", ID),
        ("webhook-timestamp", &timestamp.to_string()),
        ("webhook-signature", signature),
    ])
}

fn webhook_auth() -> IngestAuth {
    IngestAuth::new(None, &[SECRET.to_owned()], Duration::from_secs(300)).unwrap()
}

#[test]
fn the_standard_webhooks_test_vector_verifies() {
    let auth = webhook_auth();
    assert_eq!(
        auth.check_signature(&signed(SIGNATURE, TIMESTAMP), BODY, TIMESTAMP),
        Ok(())
    );
    // Several signatures (key rotation): one valid is enough.
    let rotated = format!("v1,AAAA {SIGNATURE}");
    assert_eq!(
        auth.check_signature(&signed(&rotated, TIMESTAMP), BODY, TIMESTAMP),
        Ok(())
    );
}

#[test]
fn a_changed_body_old_timestamp_or_missing_header_is_refused() {
    let auth = webhook_auth();
    let refused = Err(AuthError::Unauthenticated);
    assert_eq!(
        auth.check_signature(&signed(SIGNATURE, TIMESTAMP), b"{\"test\": 1}", TIMESTAMP),
        refused
    );
    assert_eq!(
        auth.check_signature(&signed(SIGNATURE, TIMESTAMP), BODY, TIMESTAMP + 301),
        refused
    );
    assert_eq!(
        auth.check_signature(&signed(SIGNATURE, TIMESTAMP), BODY, TIMESTAMP - 301),
        refused
    );
    assert_eq!(
        auth.check_signature(&signed("v2,abc", TIMESTAMP), BODY, TIMESTAMP),
        refused
    );
    assert_eq!(
        auth.check_signature(&headers(&[("webhook-id", ID)]), BODY, TIMESTAMP),
        refused
    );
}

#[test]
fn the_shared_token_works_as_bearer_or_query_parameter() {
    let auth = IngestAuth::new(Some("t0ken".into()), &[], Duration::from_secs(300)).unwrap();
    assert!(auth.enabled());
    assert_eq!(
        auth.check(&headers(&[("authorization", "Bearer t0ken")]), None, b""),
        Ok(())
    );
    assert_eq!(
        auth.check(&HeaderMap::new(), Some("a=1&token=t0ken"), b""),
        Ok(())
    );
    assert_eq!(
        auth.check(&headers(&[("authorization", "Bearer nope")]), None, b""),
        Err(AuthError::Unauthenticated)
    );
    assert_eq!(
        auth.check(&HeaderMap::new(), None, b""),
        Err(AuthError::Unauthenticated)
    );
    assert!(!IngestAuth::default().enabled());
}

#[test]
fn bad_secrets_are_configuration_errors() {
    assert!(matches!(
        IngestAuth::new(None, &["whsec_***".into()], Duration::ZERO),
        Err(ConfigError::BadSecret)
    ));
}

#[test]
fn grpc_tokens_carry_scopes() {
    let auth =
        GrpcAuth::new(&["subscribe:reader".into(), "subscribe,publish:writer".into()]).unwrap();
    let reader = headers(&[("authorization", "Bearer reader")]);
    let writer = headers(&[("authorization", "Bearer writer")]);
    assert_eq!(auth.check(&reader, Scope::Subscribe), Ok(()));
    assert_eq!(
        auth.check(&reader, Scope::Publish),
        Err(AuthError::Forbidden)
    );
    assert_eq!(auth.check(&writer, Scope::Publish), Ok(()));
    assert_eq!(
        auth.check(&HeaderMap::new(), Scope::Subscribe),
        Err(AuthError::Unauthenticated)
    );
    assert!(GrpcAuth::new(&["read:x".into()]).is_err());
    assert!(GrpcAuth::new(&["subscribe".into()]).is_err());
}

#[test]
fn the_query_token_is_percent_decoded() {
    assert_eq!(
        query_token("a=1&token=p%40ss%2Bw").as_deref(),
        Some("p@ss+w")
    );
    assert_eq!(query_token("token=a+b").as_deref(), Some("a b"));
    assert_eq!(query_token("tokens=x"), None);
    let auth = IngestAuth::new(Some("p@ss+w".into()), &[], Duration::from_secs(300)).unwrap();
    assert_eq!(
        auth.check_head(&HeaderMap::new(), Some("token=p%40ss%2Bw")),
        Ok(HeadCheck::Authenticated)
    );
    assert_eq!(
        auth.check_head(&HeaderMap::new(), Some("token=p@ss+w")),
        Err(AuthError::Unauthenticated),
        "undecoded, `+` is a space"
    );
}

#[test]
fn tokens_of_any_length_are_compared_by_digest() {
    let auth = IngestAuth::new(Some("t0ken".into()), &[], Duration::from_secs(300)).unwrap();
    for presented in ["", "t", "t0ke", "t0ken0", "t0ken-and-much-more", "T0KEN"] {
        let header = format!("Bearer {presented}");
        assert_eq!(
            auth.check_head(&headers(&[("authorization", &header)]), None),
            Err(AuthError::Unauthenticated),
            "{presented:?}"
        );
    }
    assert!(
        !format!("{auth:?}").contains("t0ken"),
        "the token is not printed"
    );
}

#[test]
fn the_head_check_refuses_missing_or_stale_signature_headers_before_the_body() {
    let auth = webhook_auth();
    let now = now_secs();
    assert_eq!(
        auth.check_head(&signed(SIGNATURE, now), None),
        Ok(HeadCheck::AwaitingSignature)
    );
    for refused in [
        HeaderMap::new(),
        signed(SIGNATURE, now - 600),
        signed("v2,abc", now),
        headers(&[("webhook-id", ID)]),
    ] {
        assert_eq!(
            auth.check_head(&refused, None),
            Err(AuthError::Unauthenticated)
        );
    }
    // With a token as well, the token authenticates before the body; the signature still counts.
    let both = IngestAuth::new(
        Some("t0ken".into()),
        &[SECRET.to_owned()],
        Duration::from_secs(300),
    )
    .unwrap();
    let mut with_token = signed(SIGNATURE, now);
    with_token.insert("authorization", HeaderValue::from_static("Bearer t0ken"));
    assert_eq!(
        both.check_head(&with_token, None),
        Ok(HeadCheck::Authenticated)
    );
    assert_eq!(
        both.check_body(&with_token, BODY),
        Err(AuthError::Unauthenticated),
        "the test vector's signature is for another timestamp"
    );
}
