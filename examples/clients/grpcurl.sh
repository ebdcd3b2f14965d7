#!/usr/bin/env bash
# gRPC `loraplane.v1.Inference/Generate` (server streaming) with grpcurl. The agents serve
# reflection, so no .proto files are needed; the API key goes in `authorization` metadata.
#   kubectl -n loraplane-system port-forward svc/llama3-8b 50051:50051
set -euo pipefail
ADDR="${ADDR:-localhost:50051}"
API_KEY="${API_KEY:?set API_KEY to a tenant key}"
ADAPTER="${ADAPTER:-sql-expert}"

grpcurl -plaintext "$ADDR" list
grpcurl -plaintext "$ADDR" describe loraplane.v1.GenerateRequest

grpcurl -plaintext -H "authorization: Bearer $API_KEY" -d @ "$ADDR" loraplane.v1.Inference/Generate <<JSON
{
  "request_id": "example-1",
  "adapter": "$ADAPTER",
  "chat": {
    "messages": [{"role": "user", "content": "Write a query counting orders per day."}],
    "add_generation_prompt": true
  },
  "sampling": {"max_tokens": 64, "temperature": 0}
}
JSON

# Health, as Kubernetes probes and load balancers see it.
grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check
