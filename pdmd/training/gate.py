"""Who may start, stop or resume training jobs on this server: the gate for public servers."""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass


class GateClosed(ValueError):
    """A training request from someone the gate does not let through; the message says why."""


TRAINING_ENV, TOKEN_ENV = "PDMD_TRAINING", "PDMD_TRAIN_TOKEN"


@dataclass(frozen=True)
class Gate:
    """Who may start or stop jobs: everyone (``on``), nobody (``off``) or holders of a token (``token``).

    ``PDMD_TRAINING`` picks the mode; unset, it is ``on`` except on a Hugging Face Space (``SPACE_ID`` set),
    where a public page must not hand every visitor a CPU: there it is ``off``.
    """
    mode: str
    token: str = ""
    note: str = ""

    @classmethod
    def from_env(cls, env=None) -> "Gate":
        env = os.environ if env is None else env
        default = "off" if env.get("SPACE_ID") else "on"
        mode = env.get(TRAINING_ENV, default).strip().lower() or default
        token = env.get(TOKEN_ENV, "")
        if mode not in ("on", "off", "token"):  # fail closed: a typo must not open a public server
            return cls("off", note=f"{TRAINING_ENV}={mode!r} is not on, off or token, so training is off")
        if mode == "token" and not token:
            return cls("off", note=f"{TRAINING_ENV}=token but {TOKEN_ENV} is empty, so training is off")
        return cls(mode, token)

    def describe(self) -> str:
        if self.mode == "on":
            return "Training is **on**: anyone who can open this page can start and stop jobs."
        if self.mode == "token":
            return f"Training **needs the token** ({TOKEN_ENV}): enter it to start, stop or resume jobs."
        return f"Training is **off** on this server ({self.note or TRAINING_ENV + '=off'}); past jobs stay visible."

    def check(self, token) -> None:
        if self.mode == "on":
            return
        if self.mode == "off":
            raise GateClosed(f"training is turned off on this server ({self.note or TRAINING_ENV + '=off'})")
        if not hmac.compare_digest(str(token or "").encode(), self.token.encode()):
            raise GateClosed("wrong or missing training token: ask the server's owner for it")


