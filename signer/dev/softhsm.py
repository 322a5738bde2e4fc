"""SoftHSM2 for development and tests: find the module, write a config, initialise tokens.

SoftHSM reads ``SOFTHSM2_CONF`` once, when a process initialises the module, and only sees the
tokens present then. So a process picks one config (token directory) before it first opens an
HSM, and ``softhsm2-util`` runs with ``SOFTHSM2_CONF`` set in the child's environment only.
PINs are passed to ``softhsm2-util`` as arguments and never printed or put in error messages.
"""

from __future__ import annotations

import glob
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODULE_ENV = "SIGNET_PKCS11_MODULE"

# Where distributions install the module: Debian/Ubuntu (per-arch and legacy), Fedora/RHEL,
# Alpine, source builds.
MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/lib/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
_MODULE_GLOBS: tuple[str, ...] = ("/usr/lib/*-linux-gnu/softhsm/libsofthsm2.so",)

# Keep in step with softhsm/softhsm2.conf.template (a test checks they match).
CONF_TEMPLATE = """\
# SoftHSM2 configuration for Signet development and tests (written by signer.dev.softhsm).
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
slots.mechanisms = ALL
# Signer worker processes may fork after the parent touched the module.
library.reset_on_fork = true
"""

MAX_LABEL_LENGTH = 32  # CK_TOKEN_INFO.label is 32 bytes


class SoftHsmSetupError(RuntimeError):
    """SoftHSM could not be found or set up; the message says what to install or fix."""


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM token: what a process needs to open it (plus its PIN)."""

    conf_path: Path  # give it to the process as SOFTHSM2_CONF before it loads the module
    module_path: str
    label: str

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a child process that should open this token."""
        env = dict(os.environ if base is None else base)
        env["SOFTHSM2_CONF"] = str(self.conf_path)
        env[MODULE_ENV] = self.module_path
        return env


def find_softhsm_module() -> str:
    """The path of ``libsofthsm2.so``: ``$SIGNET_PKCS11_MODULE`` if set, else the first of the
    usual distribution locations that exists.

    Raises ``SoftHsmSetupError`` if the override points nowhere or nothing is installed.
    """
    override = os.environ.get(MODULE_ENV, "").strip()
    if override:
        if not Path(override).is_file():
            raise SoftHsmSetupError(f"{MODULE_ENV}={override} does not name an existing file")
        return override
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    for pattern in _MODULE_GLOBS:
        for match in sorted(glob.glob(pattern)):
            return match
    raise SoftHsmSetupError(
        "SoftHSM2 module libsofthsm2.so not found; install it (Debian/Ubuntu: "
        f"`apt-get install softhsm2`, Fedora: `dnf install softhsm`) or set {MODULE_ENV}"
    )


def write_softhsm_conf(directory: str | os.PathLike[str]) -> Path:
    """Write ``softhsm2.conf`` in ``directory`` with its token store in ``directory/tokens``
    (created). Returns the config path. Overwrites an existing config there."""
    base = Path(directory).resolve()
    tokendir = base / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf_path = base / "softhsm2.conf"
    conf_path.write_text(CONF_TEMPLATE.format(tokendir=tokendir), encoding="utf-8")
    return conf_path


def token_labels(conf_path: str | os.PathLike[str]) -> list[str]:
    """Labels of the initialised tokens in the store ``conf_path`` points at.

    Raises ``SoftHsmSetupError`` if ``softhsm2-util`` is missing or fails."""
    result = _softhsm2_util(conf_path, ["--show-slots"])
    labels = []
    for line in result.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and name == "Label" and value.strip():
            labels.append(value.strip())
    return labels


def init_token(conf_path: str | os.PathLike[str], label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a token labelled ``label`` in a free slot, unless one with that label exists
    (then nothing happens, whatever its PINs).

    Raises ``SoftHsmSetupError`` for a label SoftHSM cannot store or a failing
    ``softhsm2-util`` (the message never contains the PINs)."""
    if not label or len(label.encode("utf-8")) > MAX_LABEL_LENGTH or label != label.strip():
        raise SoftHsmSetupError(
            f"token label {label!r} must be 1-{MAX_LABEL_LENGTH} bytes without outer spaces"
        )
    if label in token_labels(conf_path):
        return
    _softhsm2_util(
        conf_path,
        ["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin],
        secrets=(so_pin, user_pin),
    )


def _softhsm2_util(
    conf_path: str | os.PathLike[str], args: list[str], secrets: tuple[str, ...] = ()
) -> str:
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = str(conf_path)
    command = ["softhsm2-util", *args]
    shown = " ".join("***" if arg in secrets else arg for arg in command)
    try:
        completed = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise SoftHsmSetupError(
            "softhsm2-util not found on PATH; install SoftHSM2 (Debian: `apt-get install softhsm2`)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SoftHsmSetupError(f"`{shown}` did not finish within 60 s") from None
    if completed.returncode != 0:
        output = (completed.stderr + completed.stdout).strip()
        for secret in secrets:
            if secret:
                output = output.replace(secret, "***")
        raise SoftHsmSetupError(
            f"`{shown}` failed (exit {completed.returncode}) with SOFTHSM2_CONF={conf_path}: "
            f"{output}"
        )
    return completed.stdout
