"""Optional access control: nobody sees data before signing in, when a password or OIDC is configured.

- password: the secret lives in the environment variable named by ``[dashboard] password_env`` (never in a
  file or a log) and is compared in constant time with ``hmac.compare_digest``;
- OIDC: Streamlit's own ``st.login`` with the ``[auth]`` section of ``.streamlit/secrets.toml``;
- ``auth = "password"`` with no password set shows nothing: access control fails closed.
"""
from __future__ import annotations

import hmac
import logging
import os
from typing import Mapping

import streamlit as st

from .settings import DashboardSettings

log = logging.getLogger(__name__)
_SIGNED_IN = "fp_signed_in"


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all is the common case, and Streamlit raises for it
        return False


def auth_mode(cfg: DashboardSettings, environ: Mapping[str, str] | None = None, oidc: bool | None = None) -> str:
    """The effective mode: none | password | oidc."""
    environ = os.environ if environ is None else environ
    if cfg.auth != "auto":
        return cfg.auth
    if environ.get(cfg.password_env):
        return "password"
    return "oidc" if (oidc_configured() if oidc is None else oidc) else "none"


def password_matches(given: str, secret: str) -> bool:
    return bool(secret) and hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8"))


def require_sign_in(cfg: DashboardSettings) -> bool:
    """Draw the sign-in form when needed; True once the viewer may see data."""
    mode = auth_mode(cfg)
    if mode == "none":
        return True
    if mode == "oidc":
        return _oidc(cfg)
    return _password(cfg)


def _password(cfg: DashboardSettings) -> bool:
    secret = os.environ.get(cfg.password_env, "")
    if not secret:
        st.error(f"Access control is set to password, but ${cfg.password_env} is empty: no data is shown. "
                 "Set the variable and restart the dashboard.")
        return False
    if st.session_state.get(_SIGNED_IN):
        if st.sidebar.button("Sign out", key="fp_sign_out"):
            st.session_state[_SIGNED_IN] = False
            st.rerun()
        return True
    st.title("FinPulse")
    with st.form("fp_sign_in"):
        given = st.text_input("Password", type="password", key="fp_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        if password_matches(given, secret):
            st.session_state[_SIGNED_IN] = True
            st.rerun()
        log.warning("dashboard: a sign-in attempt with a wrong password")
        st.error("Wrong password.")
    return False


def _oidc(cfg: DashboardSettings) -> bool:
    if st.user.is_logged_in:
        if st.sidebar.button("Log out", key="fp_log_out"):
            st.logout()
        return True
    st.title("FinPulse")
    st.write("Sign in to see the dashboard.")
    if st.button("Log in", key="fp_log_in"):
        st.login(cfg.oidc_provider or None)
    return False
