"""A downstream service's event loop, in Python with grpcio: subscribe with a filter, handle each
event, and survive disconnects without repeating or skipping an event.

The same program as examples/consumer.rs:
- stubs generated from the repository's proto/ by grpcio-tools (run generate.sh first);
- a SubscribeRequest with a Filter (event types and chat ids; values within a field are ORed,
  fields are ANDed);
- the cursor: the sequence of the last event handled. On any stream error, disconnect or gateway
  restart it reconnects with exponential backoff and resumes with after_sequence = last; the
  gateway sends events in sequence order without gaps, so nothing repeats and nothing is skipped.
  A real service stores the cursor with the effect of handling the event and passes it back as
  --after when it restarts;
- which errors to retry: UNAVAILABLE, transport errors and a stream that ends are retried;
  OUT_OF_RANGE (the cursor was removed by retention), FAILED_PRECONDITION (the gateway serves
  another store than the one the cursor came from: its `iqgw-store` header, sent back as
  `store`), INVALID_ARGUMENT and authentication errors are not;
- an event this program cannot decode (say, nested deeper than protobuf's recursion limit) is
  reported with its sequence and passed, never reconnected to forever: each event's bytes are
  decoded here, one at a time, not by the gRPC stub.

It prints one line per event, `SEQUENCE TYPE chat=CHAT actor=ACTOR` (`-` for a missing chat or an
anonymous actor); reconnects are reported on stderr.

    python consumer.py --server http://127.0.0.1:8080 --type message_created --after 0
"""

import argparse
import os
import sys
import time

import grpc
from google.protobuf.message import DecodeError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated"))

from iqchannels.gateway.v1 import gateway_pb2  # noqa: E402

# The shortest and longest wait between reconnect attempts, in seconds.
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0

# Errors that retrying cannot fix.
FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def parse_args():
    p = argparse.ArgumentParser(
        description="Prints the events an iqchannels-gateway streams, resuming after disconnects."
    )
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the gateway's gRPC address")
    p.add_argument("--type", dest="types", action="append", default=[],
                   help="only events of this type (repeat or comma-separate)")
    p.add_argument("--chat", dest="chats", action="append", default=[],
                   help="only events of this chat id (repeat or comma-separate)")
    p.add_argument("--after", type=int, default=0,
                   help="start after this sequence; 0: from the oldest retained event")
    p.add_argument("--token", default=os.environ.get("IQGW_TOKEN"),
                   help="bearer token with the subscribe scope (env IQGW_TOKEN)")
    p.add_argument("--ca-cert", default=os.environ.get("IQGW_CA_CERT"),
                   help="PEM file of the CA (or the self-signed certificate itself) that an https "
                        "gateway's certificate must chain to (env IQGW_CA_CERT); default: the "
                        "system's roots")
    p.add_argument("--exit-after", type=int, help="exit (status 0) after printing this many events")
    args = p.parse_args()
    args.types = [t for value in args.types for t in value.split(",") if t]
    args.chats = [int(c) for value in args.chats for c in value.split(",") if c]
    return args


def open_channel(server, ca_cert=None):
    """A channel to `http://host:port` (cleartext) or `https://host:port` (TLS, verified with the
    certificates of the PEM file `ca_cert`, else the system's roots)."""
    if server.startswith("https://"):
        roots = None
        if ca_cert:
            with open(ca_cert, "rb") as f:
                roots = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(server[len("https://"):], credentials)
    return grpc.insecure_channel(server.removeprefix("http://"))


def sequence_of(data):
    """The sequence (field 1, a varint) of an encoded Event that does not decode, or None."""
    def varint(at):
        value, shift = 0, 0
        while at < len(data):
            byte = data[at]
            value |= (byte & 0x7F) << shift
            at += 1
            if not byte & 0x80:
                return value, at
            shift += 7
        raise ValueError("truncated varint")

    at = 0
    try:
        while at < len(data):
            key, at = varint(at)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, at = varint(at)
                if field == 1:
                    return value
            elif wire == 2:
                length, at = varint(at)
                at += length
            elif wire == 1:
                at += 8
            elif wire == 5:
                at += 4
            else:
                return None
    except ValueError:
        return None
    return None


def line(event):
    """`SEQUENCE TYPE chat=CHAT actor=ACTOR`, `-` for what the event lacks."""
    chat_event = event.envelope.chat_event
    chat = str(chat_event.chat_id) if chat_event.HasField("chat_id") else "-"
    return f"{event.sequence} {chat_event.type or '-'} chat={chat} actor={chat_event.actor or '-'}"


def main():
    args = parse_args()
    # Subscribe through a raw deserializer: the bytes of each event are decoded in the loop, so
    # one event that does not decode is reported and passed instead of failing the stream.
    subscribe = open_channel(args.server, args.ca_cert).unary_stream(
        "/iqchannels.gateway.v1.EventGateway/Subscribe",
        request_serializer=gateway_pb2.SubscribeRequest.SerializeToString,
        response_deserializer=lambda data: data,
    )
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    event_filter = gateway_pb2.Filter(event_types=args.types, chat_ids=args.chats)

    last = args.after or None  # the cursor: the last sequence handled
    store = None  # the store the cursor belongs to: sent back with every resume
    printed = 0
    backoff = BACKOFF_MIN
    while True:
        if last is None:
            request = gateway_pb2.SubscribeRequest(filter=event_filter, beginning={})
        else:
            request = gateway_pb2.SubscribeRequest(
                filter=event_filter, after_sequence=last, store=store or ""
            )
        call = subscribe(request, metadata=metadata)
        try:
            if store is None:
                store = dict(call.initial_metadata()).get("iqgw-store")
            for data in call:
                try:
                    event = gateway_pb2.Event.FromString(data)
                except DecodeError as error:
                    sequence = sequence_of(data)
                    if sequence is None:
                        print(f"consumer: an event without a sequence does not decode ({error})",
                              file=sys.stderr)
                        return 1
                    print(f"consumer: event {sequence} cannot be decoded ({error}); skipped",
                          file=sys.stderr, flush=True)
                    last = sequence
                    continue
                print(line(event), flush=True)
                last = event.sequence
                backoff = BACKOFF_MIN
                printed += 1
                if args.exit_after is not None and printed >= args.exit_after:
                    call.cancel()
                    return 0
            reason = "UNAVAILABLE: the stream ended"
        except grpc.RpcError as error:
            if error.code() in FATAL:
                print(f"consumer: subscription failed: {error.code().name}: {error.details()}",
                      file=sys.stderr)
                return 1
            reason = f"{error.code().name}: {error.details()}"
        cursor = "the beginning" if last is None else f"sequence {last}"
        print(f"consumer: {reason}; resuming after {cursor} in {backoff:.1f}s",
              file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
