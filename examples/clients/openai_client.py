"""The OpenAI-compatible API with the official `openai` Python package (pip install openai).

    kubectl -n loraplane-system port-forward svc/llama3-8b 8000:8000
    API_KEY=sk-... python openai_client.py

`model` is the adapter's name (a LoraAdapter in the key's namespace) or the base model's name.
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://localhost:8000/v1"),
    api_key=os.environ["API_KEY"],  # a tenant key: the api-key of a labelled Secret
)
model = os.environ.get("MODEL", "sql-expert")

print([m.id for m in client.models.list().data])

completion = client.completions.create(
    model=model, prompt="SELECT name FROM users WHERE", max_tokens=32, temperature=0
)
print(completion.choices[0].text)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a query counting orders per day."}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
