"""The `--put BUCKET/KEY=PATH` arguments shared by the object-store helpers (`s3_server.py`,
`azure_setup.py`): which buckets (or containers) to create, and what to upload where."""


def parse_puts(specs, named):
    """Returns the buckets to create, sorted (those `named` plus every one a spec uploads
    into), and the uploads as `(bucket, key, path)` in the order given."""
    buckets = set(named)
    puts = []
    for spec in specs:
        target, path = spec.split("=", 1)
        bucket, key = target.split("/", 1)
        buckets.add(bucket)
        puts.append((bucket, key, path))
    return sorted(buckets), puts
