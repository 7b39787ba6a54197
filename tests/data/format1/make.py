#!/usr/bin/env python3
"""Writes the format-1 store fixture of tests/upgrade.rs: events.redb, as the last release before
store format versions (commit f74205b) wrote it, and events.json, what it holds as that release
served it.

    git worktree add /tmp/old f74205b
    (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old/target cargo build --bin iqchannels-gateway)
    tests/data/format1/make.py /tmp/old/target/debug/iqchannels-gateway tests/data/format1

The events are posted over HTTP (both fixtures of ../shared/fixtures, bodies with Cyrillic text,
ids beyond 2^53 and fields that release did not know, one redelivery), read back with that
release's own `subscribe --output proto`, and the gateway is stopped with SIGTERM.
"""

import base64
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request

SHARED = pathlib.Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"

# 2^53 + 1: a double cannot hold it.
BEYOND_DOUBLE = 9007199254740993
INT64_MAX = 9223372036854775807

OWN_BODIES = [
    # One line; ChatMessage fields (TicketId, EditedAt, SingleChoices) that release did not know.
    json.dumps(
        {
            "ChatEvent": {
                "Id": BEYOND_DOUBLE,
                "Type": "message_created",
                "ChatId": 77,
                "MessageId": 9001,
                "Actor": "client",
                "ClientId": 501,
                "UserId": None,
                "CreatedAt": 1717171717171,
                "Transitive": False,
            },
            "Rels": {
                "ChatMessages": [
                    {
                        "Id": 9001,
                        "ChatId": 77,
                        "Author": "client",
                        "ClientId": 501,
                        "Payload": "text",
                        "Text": "Здравствуйте! Заказ №42 оплачен, где мой чек? ✓",
                        "CreatedAt": 1717171717100,
                        "TicketId": 3301,
                        "EditedAt": 1717171717150,
                        "SingleChoices": [{"Id": 1, "title": "Да, всё верно", "value": "да"}],
                    }
                ],
                "Clients": [{"Id": 501, "Name": "Анна Сергеевна Ёлкина"}],
            },
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ),
    # Indented, escaped Cyrillic, a trailing newline, the largest id.
    json.dumps(
        {
            "ChatEvent": {
                "Id": INT64_MAX,
                "Type": "chat_closed",
                "ChatId": 78,
                "Actor": "user",
                "UserId": 3,
                "CreatedAt": 1717171800000,
            },
            "Rels": {
                "Users": [{"Id": 3, "Name": "Пётр Оператор", "DisplayName": "Пётр"}],
                "Chats": [{"Id": 78, "ProjectId": 2, "ChannelId": 5, "ClientId": 502}],
            },
        },
        ensure_ascii=True,
        indent=2,
    )
    + "\n",
]


def post(address, body):
    request = urllib.request.Request(
        f"http://{address}/v1/events",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.status
        return json.load(response)


def varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def fields(data):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest used."""
    at = 0
    while at < len(data):
        key, at = varint(data, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = varint(data, at)
        elif kind == 2:
            length, at = varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            raise ValueError(f"unexpected wire type {kind}")
        yield number, value


def events(stream):
    """The length-delimited iqchannels.gateway.v1.Event messages of `subscribe --output proto`."""
    at = 0
    while at < len(stream):
        length, at = varint(stream, at)
        event = dict(fields(stream[at : at + length]))
        at += length
        time = dict(fields(event.get(2, b"")))
        yield {
            "sequence": event[1],
            "received_at_ms": time.get(1, 0) * 1000 + time.get(2, 0) // 1_000_000,
            "envelope_base64": base64.b64encode(event[3]).decode(),
        }


def main():
    binary, out = sys.argv[1], pathlib.Path(sys.argv[2])
    bodies = [(SHARED / name).read_bytes() for name in ("chat_closed.json", "message_created_file.json")]
    bodies += [body.encode() for body in OWN_BODIES]
    with tempfile.TemporaryDirectory() as data:
        gateway = subprocess.Popen(
            [binary, "serve", "--store", "embedded", "--data-dir", data,
             "--listen", "127.0.0.1:0", "--log-format", "json"],
            stderr=subprocess.PIPE,
        )
        address = None
        for line in gateway.stderr:
            address = json.loads(line).get("fields", {}).get("address")
            if address:
                break
        threading.Thread(target=gateway.stderr.read, daemon=True).start()
        stored = []
        for body in bodies:
            answer = post(address, body)
            assert not answer["duplicate"], answer
            envelope = json.loads(body)
            stored.append(
                {
                    "sequence": answer["sequence"],
                    "event_id": envelope["ChatEvent"]["Id"],
                    "type": envelope["ChatEvent"]["Type"],
                    "body": body.decode(),
                }
            )
        redelivered = post(address, bodies[0])
        assert redelivered == {"sequence": 1, "duplicate": True}, redelivered
        served = subprocess.run(
            [binary, "subscribe", "--server", f"http://{address}", "--from-beginning",
             "--output", "proto", "--exit-after", str(len(stored))],
            check=True, capture_output=True, timeout=60,
        ).stdout
        for event, as_served in zip(stored, events(served), strict=True):
            assert event["sequence"] == as_served["sequence"]
            event.update(as_served)
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=60) == 0
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pathlib.Path(data) / "events.redb", out / "events.redb")
    listing = {
        "written_by": "iqchannels-gateway f74205b (store format 1: no format key)",
        "events": stored,
        "redelivered": {"event_id": stored[0]["event_id"], "answer": redelivered},
    }
    (out / "events.json").write_text(json.dumps(listing, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
