"""Token rendering shared by the pages: tokens coloured by activation, special tokens boxed."""

from __future__ import annotations

import html

TOKEN_CSS = """
<style>
.tokens {font-family: ui-monospace, monospace; font-size: 0.85rem; line-height: 1.9;
         white-space: pre-wrap; word-break: break-word;}
.tokens span.t {border-radius: 3px; padding: 1px 0;}
.tokens span.special {border: 1px solid #999; border-radius: 3px; padding: 0 3px;
                      font-size: 0.7rem; color: #555; background: #eee;}
.tokens span.focus {outline: 2px solid #c2410c;}
.example {display: flex; gap: 0.8rem; align-items: baseline; margin-bottom: 0.35rem;}
.example .val {font-weight: 600; min-width: 3.5rem; text-align: right; font-size: 0.85rem;}
</style>
"""


def token_label(tokenizer, token_id: int) -> tuple[str, bool]:
    """(what to print, whether it is a special token)."""
    if token_id in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(token_id), True
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # a piece of a multi-byte character: show the raw token instead
        text = tokenizer.convert_ids_to_tokens(token_id)
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    if added is not None and added.special:
        return text, True
    return text.replace("\n", "↵\n"), False


def tokens_html(tokenizer, ids: list[int], values: list[float], scale: float,
                focus: int | None = None) -> str:
    """Tokens coloured by activation (hover shows the value); special tokens drawn as boxes."""
    out = []
    for i, (tok, val) in enumerate(zip(ids, values)):
        text, special = token_label(tokenizer, int(tok))
        alpha = 0.0 if scale <= 0 else min(max(val / scale, 0.0), 1.0)
        cls = "special" if special else "t"
        if i == focus:
            cls += " focus"
        style = f"background: rgba(234, 88, 12, {alpha:.2f});" if alpha > 0 else ""
        title = html.escape(f"{text!r} · activation {val:.3f}")
        out.append(f'<span class="{cls}" style="{style}" title="{title}">'
                   f"{html.escape(text)}</span>")
    return '<div class="tokens">' + "".join(out) + "</div>"


def example_html(tokenizer, value: float, ids: list[int], values: list[float], scale: float,
                 focus: int | None = None) -> str:
    """One example row: its value, then its tokens."""
    block = tokens_html(tokenizer, ids, values, scale, focus=focus)
    return f'<div class="example"><span class="val">{value:.2f}</span>{block}</div>'
