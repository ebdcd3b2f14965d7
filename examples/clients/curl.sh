#!/usr/bin/env bash
# The OpenAI-compatible HTTP API with curl. `model` is the adapter's name (a LoraAdapter in
# the key's namespace) or the base model's name (the BaseModel's name).
#   kubectl -n loraplane-system port-forward svc/llama3-8b 8000:8000 50051:50051
set -euo pipefail
BASE_URL="${BASE_URL:-http://localhost:8000}"
API_KEY="${API_KEY:?set API_KEY to a tenant key (the api-key of a Secret labelled loraplane.dev/api-key=true)}"
MODEL="${MODEL:-sql-expert}"

# The models this key may use: the base model and the tenant's adapters.
curl -sS "$BASE_URL/v1/models" -H "Authorization: Bearer $API_KEY"
echo

# A completion.
curl -sS "$BASE_URL/v1/completions" \
  -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"SELECT name FROM users WHERE\", \"max_tokens\": 32, \"temperature\": 0}"
echo

# A chat completion, streamed as server-sent events.
curl -sSN "$BASE_URL/v1/chat/completions" \
  -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 64,
       \"messages\": [{\"role\": \"user\", \"content\": \"Write a query counting orders per day.\"}]}"
echo
