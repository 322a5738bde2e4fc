#!/bin/sh
# Initialise the development SoftHSM token named $SIGNET_TOKEN_LABEL unless it exists.
# The PINs come from files (compose/Kubernetes secrets). softhsm2-util only takes PINs as
# arguments, so they are visible in `ps` inside this container for the moment it runs:
# acceptable for the development HSM only (docs/threat-model.md). Real HSMs are initialised
# with their vendor's tools, never with this script.
set -eu
: "${SIGNET_TOKEN_LABEL:?set SIGNET_TOKEN_LABEL to the token label in the signer config}"
: "${SIGNET_SO_PIN_FILE:=/run/secrets/hsm-so-pin}"
: "${SIGNET_PIN_FILE:=/run/secrets/hsm-pin}"
if softhsm2-util --show-slots | grep -Eq "Label:[[:space:]]+${SIGNET_TOKEN_LABEL}[[:space:]]*\$"; then
  echo "token ${SIGNET_TOKEN_LABEL} exists"
  exit 0
fi
softhsm2-util --init-token --free --label "${SIGNET_TOKEN_LABEL}" \
  --so-pin "$(cat "${SIGNET_SO_PIN_FILE}")" --pin "$(cat "${SIGNET_PIN_FILE}")" >/dev/null
echo "token ${SIGNET_TOKEN_LABEL} initialised"
