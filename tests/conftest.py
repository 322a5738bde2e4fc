"""Shared fixtures. Real processes (etcd, SoftHSM tokens, signers) live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.etcd",
    "tests.fixtures.cluster",
    "tests.fixtures.filesystems",
]
