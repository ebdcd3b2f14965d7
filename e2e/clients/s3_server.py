"""A real S3-protocol server for the agent's s3:// source tests: moto in server mode on a
loopback port, with authentication enforced (an IAM user whose key may use S3; any other key
or a wrong secret is refused the way AWS refuses it).

    python3 e2e/clients/s3_server.py [--put BUCKET/KEY=FILE ...] [--bucket NAME ...]

Creates the buckets, uploads the files with the user's key, prints one JSON line
{"endpoint", "access_key_id", "secret_access_key"} and serves until stdin closes or the
process is killed (the Rust tests own the process). Pinned by e2e/clients/requirements.txt.
"""

import argparse
import json
import os
import socket
import sys

# Requests without valid credentials are accepted only for the first N actions: the three IAM
# calls below that create the user, its key and its policy. Must be set before moto loads.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from urllib.parse import quote, unquote  # noqa: E402

import boto3  # noqa: E402
import moto.iam.access_control as access_control  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from put_specs import parse_puts  # noqa: E402


def _aws_canonical_query(path):
    """`path` with its query values encoded as SigV4 canonicalises them.

    moto rebuilds the signed request from the URL its web framework decoded (`prefix=acme%2F`
    arrives as `prefix=acme/`), while botocore's signer, which moto reuses to check the
    signature, takes a URL's query as already encoded: a list request with a `/` in its prefix
    is then refused as SignatureDoesNotMatch although AWS accepts it. Re-encoding each value
    (decoded first, so an encoded one is not encoded twice) gives back the client's canonical
    query, as AWS computes it.
    """
    base, sep, query = path.partition("?")
    if not sep:
        return path
    pairs = []
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        pairs.append(quote(unquote(key), safe="-_.~") + eq + quote(unquote(value), safe="-_.~"))
    return base + "?" + "&".join(pairs)


_iam_request_init = access_control.IAMRequestBase.__init__


def _init_with_canonical_query(self, *args, **kwargs):
    _iam_request_init(self, *args, **kwargs)
    self._path = _aws_canonical_query(self._path)


access_control.IAMRequestBase.__init__ = _init_with_canonical_query

POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", action="append", default=[])
    parser.add_argument("--put", action="append", default=[], help="BUCKET/KEY=FILE")
    args = parser.parse_args()

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bootstrap = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam = boto3.client("iam", **bootstrap)
    iam.create_user(UserName="loader")
    key = iam.create_access_key(UserName="loader")["AccessKey"]
    iam.put_user_policy(UserName="loader", PolicyName="s3", PolicyDocument=POLICY)
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    buckets, puts = parse_puts(args.put, args.bucket)
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)
    for bucket, key_name, path in puts:
        with open(path, "rb") as f:
            s3.put_object(Bucket=bucket, Key=key_name, Body=f.read())
    print(
        json.dumps(
            {
                "endpoint": endpoint,
                "access_key_id": key["AccessKeyId"],
                "secret_access_key": key["SecretAccessKey"],
            }
        ),
        flush=True,
    )
    # Serve until the owner closes stdin (or kills us).
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
