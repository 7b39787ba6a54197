#!/usr/bin/env bash
# Generates the Python protobuf and gRPC stubs for the gateway's API from the repository's proto/
# into examples/python/generated/ (gitignored). Run it with the Python that has
# requirements.txt installed: `PYTHON=.venv/bin/python examples/python/generate.sh`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/generated"
python="${PYTHON:-python3}"

rm -rf "$out"
mkdir -p "$out"
cd "$repo"
# grpc_tools.protoc adds its bundled google/protobuf/*.proto to the include path by itself.
"$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" \
    proto/iqchannels/gateway/v1/gateway.proto proto/iqchannels/webhook/v1/*.proto
echo "generated stubs in $out"
