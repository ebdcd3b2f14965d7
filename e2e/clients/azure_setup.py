"""Creates containers and blobs in an Azure Blob Storage account (Azurite in the tests) with the
official SDK, so the agent's az:// source tests read what a user's upload would have written.

    python3 e2e/clients/azure_setup.py --endpoint URL --account NAME --key KEY \
        [--container NAME ...] [--put CONTAINER/BLOB=FILE ...]

Pinned by e2e/clients/requirements.txt; e2e/src/object_stores.rs runs it.
"""

import argparse

from azure.storage.blob import BlobServiceClient
from put_specs import parse_puts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--account", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--container", action="append", default=[])
    parser.add_argument("--put", action="append", default=[], help="CONTAINER/BLOB=FILE")
    args = parser.parse_args()

    service = BlobServiceClient(
        account_url=args.endpoint,
        credential={"account_name": args.account, "account_key": args.key},
    )
    containers, puts = parse_puts(args.put, args.container)
    for container in containers:
        service.create_container(container)
    for container, blob, path in puts:
        with open(path, "rb") as f:
            service.get_blob_client(container, blob).upload_blob(f, overwrite=True)


if __name__ == "__main__":
    main()
