"""Pieces of :class:`~bbfl.blackbox.openai_api.OpenAIBlackBox`: reading responses safely (``responses``) and
when and how long to retry (``retry``)."""
