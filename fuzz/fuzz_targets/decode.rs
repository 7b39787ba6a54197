//! Fuzzes the webhook decoder: any bytes either decode to an envelope that survives a protobuf
//! round trip (with deviations exactly when the strict policy refuses them), or are rejected with
//! an error that names a path and says what is wrong.

#![no_main]

use iqchannels_gateway::decode;
use iqchannels_gateway::pb::webhook::v1::Envelope;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    match decode::decode(data) {
        Ok(decode::Decoded {
            envelope,
            deviations,
        }) => {
            // The strict policy refuses exactly the bodies with deviations.
            assert_eq!(
                decode::decode_with(data, decode::Policy::Strict).is_ok(),
                deviations.is_empty(),
                "strict and tolerant disagree: {deviations:?}"
            );
            let keys = decode::keys(&envelope);
            let event = envelope
                .chat_event
                .as_ref()
                .expect("decode checks ChatEvent");
            assert_eq!(keys.event_id, event.id);
            assert!(!keys.event_type.is_empty(), "decode checks ChatEvent.Type");
            let bytes = envelope.encode_to_vec();
            let again = Envelope::decode(bytes.as_slice()).expect("own encoding decodes");
            assert_eq!(again, envelope, "protobuf round trip changed the envelope");
            decode::validate(&again).expect("a decoded envelope stays valid");
        }
        Err(error) => {
            assert!(!error.path.is_empty(), "error without a path: {error:?}");
            assert!(
                !error.message.is_empty(),
                "error without a message: {error:?}"
            );
        }
    }
});
