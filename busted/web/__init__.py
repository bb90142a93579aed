"""The web page (``busted monitor --ui``, ``busted ui --store``): live calls, spend, flows, decisions.

``WebState`` (bounded windows, no I/O) -> ``make_app`` (Starlette routes behind a token) ->
``WebUI`` (uvicorn in a thread, fed like any sink). docs/outputs.md, "The web page".
"""

from busted.web.server import DEFAULT_ADDR, WebUI, parse_addr
from busted.web.state import Filters, WebState

__all__ = ["DEFAULT_ADDR", "Filters", "WebState", "WebUI", "parse_addr"]
