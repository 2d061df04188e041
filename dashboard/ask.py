"""The Ask view: an analyst types or pastes headlines and comments, one a line, and sees what the model the worker
loads makes of each: its sentiment and score, its topic and how sure it is, and which words pushed it there
(``models.explain``: each word is left out in turn and the text scored again).

The model is loaded into the dashboard process on first use, on the CPU in the worker's CPU precision (so the
version and the figures are the worker's), and shared by every session. ``[dashboard] ask_model = false`` leaves
the view out, for a dashboard host that must not hold a model in memory; so does a worker that scores without a
model (``[worker] scorer = baseline``).
"""
from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import streamlit as st

from models.interface import load_scorer
from stream.config import WorkerSettings

from .model_card import find_model

log = logging.getLogger(__name__)
MAX_TEXTS = 50          # a question, not a batch job: `finpulse score --input` is for files
_SHOWN = "fp_ask_readings"
_GIVEN = "fp_ask_given"     # texts another view hands to this one (``ask_button``)
SENTIMENT_COLOUR = {"bearish": "red", "neutral": "gray", "bullish": "green"}
# Word backgrounds, by what the analyst colours by: for the sentiment, red pushed toward bearish and green toward
# bullish; for the topic, blue made the predicted topic likelier and orange less likely. A push this size or more
# is drawn at full strength, so that a text none of whose words matter much stays pale instead of looking decisive.
FULL_PUSH = 0.3
PUSH_RGB = {"sentiment": {True: "22, 163, 74", False: "220, 38, 38"},
            "topic": {True: "37, 99, 235", False: "234, 88, 12"}}
LEGEND = {"sentiment": "Words on red pushed the reading toward bearish, on green toward bullish",
          "topic": "Words on blue made the topic likelier, on orange less likely"}


@st.cache_resource(max_entries=1, show_spinner=False)
def shared_scorer(path: str, saved_at_ns: int, cpu_precision: str):
    """One scorer per model directory (and its save time: a directory replaced in place is loaded again)."""
    return load_scorer("model", path, device="cpu", tokenizer_processes=0, cpu_precision=cpu_precision)


def ask_button(ask_page: Any, texts: Sequence[str], key: str) -> None:
    """Under a table of messages: a button that opens the Ask view on them (the first ``MAX_TEXTS``), to see
    which words moved each one's score. Nothing when the Ask view is off (``ask_page`` None) or there are none."""
    if ask_page is None or not len(texts):
        return
    if st.button("Why these scores? Ask the model", key=key, icon=":material/psychology:",
                 help=f"Opens the Ask view on these messages (the first {MAX_TEXTS}): which words pushed each score"):
        st.session_state[_GIVEN] = [" ".join(str(text).split()) for text in list(texts)[:MAX_TEXTS]]
        st.switch_page(ask_page)


def render_ask(worker: WorkerSettings, models_dir: str) -> None:
    """``worker``: the ``[worker]`` settings, so that the model asked is the one the worker scores with."""
    given = st.session_state.pop(_GIVEN, None)
    path = find_model(worker.model_dir, models_dir)
    if path is None:
        st.info("No trained model directory was found, so there is no model to ask: `finpulse train` trains one.")
        return
    if given:
        st.session_state["fp_ask_text"] = "\n".join(given)
    with st.form("fp-ask", border=False):
        typed = st.text_area("Headlines or comments, one a line", key="fp_ask_text", height=140,
                             placeholder="Oil slides as OPEC+ signals more supply\n$ACME beats estimates and raises "
                                         "its dividend")
        asked = st.form_submit_button("Ask the model", type="primary", icon=":material/psychology:")
    if asked or given:
        _ask(path, worker.cpu_precision, [line.strip() for line in typed.splitlines() if line.strip()])
    shown = st.session_state.get(_SHOWN)
    if shown:
        _show(*shown)


def _ask(path: Path, cpu_precision: str, texts: list[str]) -> None:
    from models.explain import read_texts
    if not texts:
        st.warning("Type a headline or comment first.")
        return
    if len(texts) > MAX_TEXTS:
        st.warning(f"{len(texts)} lines: the first {MAX_TEXTS} are read. `finpulse score --input FILE` scores a file "
                   "of any length.")
        texts = texts[:MAX_TEXTS]
    try:
        with st.spinner("Reading…"):
            scorer = shared_scorer(str(path), (path / "config.json").stat().st_mtime_ns, cpu_precision)
            st.session_state[_SHOWN] = (scorer.model_version, read_texts(scorer, texts))
    except Exception as exc:  # a model directory that cannot be loaded: say so on the page, the log has the rest
        log.exception("the Ask view could not load or run the model in %s", path)
        st.error(f"The model in `{path}` could not be asked ({type(exc).__name__}: {exc}).")


def _show(model_version: str, readings: list) -> None:
    colour_by = st.radio("Colour words by", list(PUSH_RGB), horizontal=True, key="fp_ask_colour")
    st.caption(f"Read by `{model_version.replace('`', '')}` on this dashboard's CPU. {LEGEND[colour_by]}: each is "
               "compared with the text read without that word. Point at a word for its figures.")
    if len(readings) > 1:
        st.dataframe(pd.DataFrame([_summary(r) for r in readings]), key="fp-ask-table", hide_index=True,
                     column_config={"score": st.column_config.NumberColumn(format="%+.2f"),
                                    "confidence": st.column_config.NumberColumn(format="percent")})
    for number, reading in enumerate(readings, start=1):
        with st.container(border=True, key=f"fp-ask-{number}"):
            _reading(reading, colour_by)


def _summary(reading) -> dict:
    p = reading.prediction
    return {"text": reading.text, "sentiment": p.sentiment if p.ok else "—",
            "score": p.sentiment_score if p.ok else None, "topic": p.topic if p.ok else "—",
            "confidence": p.topic_confidence if p.ok else None, "error": p.error or ""}


def _reading(reading, colour_by: str) -> None:
    p = reading.prediction
    if not p.ok:
        st.text(reading.text or "(empty)")
        st.warning(f"Not scored: {p.error}")
        return
    st.markdown(f":{SENTIMENT_COLOUR[p.sentiment]}[**{p.sentiment}**] · score **{p.sentiment_score:+.2f}** · "
                f"**{p.topic}** ({p.topic_confidence:.0%})")
    st.html(highlighted(reading, colour_by))
    sentiments = " · ".join(f"P({label}) {value:.2f}" for label, value in reading.sentiments.items())
    others = ", ".join(f"{topic} {value:.0%}" for topic, value in reading.topics[1:])   # label names: plain
    st.caption(sentiments + (f" · next topics: {others}" if others else "") +
               (f" · {reading.note}" if reading.note else ""))


def highlighted(reading, colour_by: str = "sentiment") -> str:
    """The text as HTML, each word on a background that says which way it pushed the sentiment (or the topic) and
    how hard."""
    if not reading.words:
        return f'<div class="fp-ask-text">{html.escape(reading.text)}</div>'
    spans = []
    for push in reading.words:
        if math.isnan(push.sentiment):
            spans.append(f'<span title="the text without it cannot be scored">{html.escape(push.word)}</span>')
            continue
        value = getattr(push, colour_by)
        strength = min(1.0, abs(value) / FULL_PUSH) * 0.6
        spans.append(f'<span style="background: rgba({PUSH_RGB[colour_by][value > 0]}, {strength:.2f}); '
                     f'border-radius: 3px; padding: 0 2px" title="score {push.sentiment:+.2f} with this word; '
                     f'topic probability {push.topic:+.2f}">{html.escape(push.word)}</span>')
    return f'<div class="fp-ask-text" style="line-height: 1.9; text-align: left">{" ".join(spans)}</div>'
