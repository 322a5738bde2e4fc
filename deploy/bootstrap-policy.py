"""Store the first access policy in etcd, only if none exists yet (compare-and-swap create).

Superseded by ``signet init --config signer.yaml --custodian NAME=PUB.pem … --threshold M
--policy FILE`` (docs/adr/0009-custodian-ceremonies.md), which stores the custodian set as well:
without a custodian set no ceremony — and so no key — can be made. Kept for policy-only
bootstraps of existing deployments.

``signet policy apply`` needs an administrator, and administrators are named by the policy, so a
new cluster's first policy is written straight to etcd. ``signet dev up`` does this for the
development cluster; this script does it for any other:

    python deploy/bootstrap-policy.py --etcd etcd-1:2379,etcd-2:2379 policy.yaml
    python deploy/bootstrap-policy.py --etcd 10.0.0.5:2379 --ca ca.pem \\
        --cert etcd-client.pem --key etcd-client-key.pem policy.yaml

Exits 0 when it stored the policy, 6 when a policy exists already (change that one with
``signet policy apply`` as an administrator).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import yaml

from kms.domain.policy import AccessPolicy
from kms.errors import Conflict
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore


async def bootstrap(config: EtcdConfig, policy: AccessPolicy) -> int:
    store = EtcdKeyStateStore(config)
    try:
        stored = await store.put_policy(policy, None)
    except Conflict:
        print("a policy exists already; change it with 'signet policy apply'", file=sys.stderr)
        return 6
    finally:
        await store.close()
    print(f"stored the access policy at revision {stored.mod_revision}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Store the first access policy in etcd.")
    parser.add_argument("policy", type=Path, help="policy file (YAML or JSON)")
    parser.add_argument("--etcd", required=True, help="comma-separated host:port of every member")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--prefix", default="/signet/v1")
    args = parser.parse_args()
    policy = AccessPolicy.from_dict(yaml.safe_load(args.policy.read_text()))
    config = EtcdConfig(endpoints=tuple(args.etcd.split(",")), ca_file=args.ca,
                        cert_file=args.cert, key_file=args.key, prefix=args.prefix)
    return asyncio.run(bootstrap(config, policy))


if __name__ == "__main__":
    sys.exit(main())
