"""User text (labels, concept-vector names, values from links, messages quoting them) shown as
text: Streamlit renders Markdown in ``st.markdown``, ``st.info``, ``st.warning`` and the like, so
an image link in a label would make every viewer's browser fetch it. ``as_text`` escapes every
character Markdown (and Streamlit's ``:color[...]`` / ``:emoji:`` directives) gives a meaning to.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&\"'=^])")


def as_text(text: object) -> str:
    """``text`` with Markdown's punctuation backslash-escaped and line breaks kept as breaks."""
    escaped = _SPECIAL.sub(r"\\\1", str(text))
    return escaped.replace("\r\n", "\n").replace("\n", "  \n")
