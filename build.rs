//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the prost/tonic code.
//!
//! Three things come out of it, all under `OUT_DIR`:
//! - `descriptor.bin`: the encoded file descriptor set, served by gRPC reflection;
//! - the server-side code: every message, with `serde::Deserialize` on the webhook mirror so the
//!   decoder reads the JSON wire format straight into the typed messages (field renames come from
//!   each field's `json_name`), and `Event` mapped to `crate::wire::WireEvent`, a pre-encoded
//!   event that every subscriber stream sends as the same bytes;
//! - `client/`: the gRPC client with a decoding `Event`, for the CLI, tests and consumers.

use std::{error::Error, path::PathBuf};

use prost::Message;
use prost_types::{field_descriptor_proto::Label, field_descriptor_proto::Type, FileDescriptorSet};

const PROTOS: &[&str] = &[
    "proto/iqchannels/webhook/v1/envelope.proto",
    "proto/iqchannels/gateway/v1/gateway.proto",
];
const WEBHOOK_PACKAGE: &str = "iqchannels.webhook.v1";
const GATEWAY_PACKAGE: &str = "iqchannels.gateway.v1";
/// Fields without which the fast decode refuses a body (no serde default, so absence is an
/// error); the tolerant decode then says what is missing. `ChatEvent.Id` is not one: a transitive
/// event has none.
const REQUIRED: &[&str] = &["ChatEvent.type"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;

    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .extern_path(
            format!(".{GATEWAY_PACKAGE}.Event"),
            "crate::wire::WireEvent",
        );
    for (path, attribute) in serde_attributes(&fds) {
        server = if path.matches('.').count() == WEBHOOK_PACKAGE.matches('.').count() + 2 {
            server.type_attribute(path, attribute)
        } else {
            server.field_attribute(path, attribute)
        };
    }
    server.compile_fds(fds.clone())?;

    let client_out = out.join("client");
    std::fs::create_dir_all(&client_out)?;
    let mut client = tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&client_out)
        .extern_path(format!(".{WEBHOOK_PACKAGE}"), "crate::pb::webhook::v1");
    for name in gateway_messages(&fds).filter(|name| name != "Event") {
        client = client.extern_path(
            format!(".{GATEWAY_PACKAGE}.{name}"),
            format!("crate::pb::gateway::v1::{name}"),
        );
    }
    client.compile_fds(fds)?;
    Ok(())
}

fn gateway_messages(fds: &FileDescriptorSet) -> impl Iterator<Item = String> + '_ {
    fds.file
        .iter()
        .filter(|file| file.package() == GATEWAY_PACKAGE)
        .flat_map(|file| file.message_type.iter().map(|m| m.name().to_owned()))
}

/// `(path, attribute)` pairs: a `Deserialize` derive for every webhook message and, for every
/// field, its wire name and how absence and `null` read.
fn serde_attributes(fds: &FileDescriptorSet) -> Vec<(String, String)> {
    let mut attributes = Vec::new();
    let webhook = fds
        .file
        .iter()
        .filter(|file| file.package() == WEBHOOK_PACKAGE);
    for message in webhook.flat_map(|file| file.message_type.iter()) {
        let message_path = format!(".{WEBHOOK_PACKAGE}.{}", message.name());
        attributes.push((
            message_path.clone(),
            "#[derive(::serde::Deserialize)]".to_owned(),
        ));
        for field in &message.field {
            let short = format!("{}.{}", message.name(), field.name());
            let rename = format!("rename = \"{}\"", field.json_name());
            let how = if REQUIRED.contains(&short.as_str()) {
                rename
            } else if field.type_name() == ".google.protobuf.Value" {
                format!("{rename}, default, deserialize_with = \"crate::decode::serde_support::opaque\"")
            } else if field.r#type() == Type::Message {
                // Objects only: serde alone would also read a struct from an array.
                let with = if field.label() == Label::Repeated {
                    "objects"
                } else {
                    "object"
                };
                format!("{rename}, default, deserialize_with = \"crate::decode::serde_support::{with}\"")
            } else if field.proto3_optional() {
                format!("{rename}, default")
            } else {
                format!("{rename}, default, deserialize_with = \"crate::decode::serde_support::null_as_default\"")
            };
            attributes.push((
                format!("{message_path}.{}", field.name()),
                format!("#[serde({how})]"),
            ));
        }
    }
    attributes
}
