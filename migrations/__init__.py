"""Schema migrations for a node's Redis, applied in order by service/storage/migrate.py.

Each module ``mNNNN_<name>.py`` exposes ``VERSION: int`` (= NNNN), ``NAME: str`` and
``async def up(redis) -> None``. ``up`` must be safe to run twice: a node killed after
``up`` but before the new version was recorded runs it again at its next start.
"""
