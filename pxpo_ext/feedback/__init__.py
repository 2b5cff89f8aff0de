"""A person's feedback on one image, in a local web page (SPEC §7.3); ``python python/feedback.py`` starts it.

:mod:`.session` runs the rounds (marks -> reward and weight maps -> a few PXPO epochs on the
prompt and seed -> the new image); :mod:`.server` serves the page in ``static/``.
"""
from .server import FeedbackServer, start_server
from .session import FeedbackSession, SessionBusy, create_session

__all__ = ["FeedbackServer", "FeedbackSession", "SessionBusy", "create_session", "start_server"]
