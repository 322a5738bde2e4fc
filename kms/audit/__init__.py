"""The tamper-evident, fail-closed audit log (invariant I3): ``log`` appends with group commit,
``merkle`` is RFC 9162 hashing and proofs, ``checkpoint`` signs tree heads, ``verify`` checks a
copy offline. See docs/adr/0005-audit-log.md."""
