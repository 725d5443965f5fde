"""What a run leaves behind, typed once: the run folder (:mod:`.folder`: its files, the lock, the epoch
log), one pydantic model per record (:mod:`.epoch`, :mod:`.summary`, :mod:`.card`, :mod:`.sweep_index`),
each used by its writer and every reader, and the readers' one entry point for folders someone hands
over (:mod:`.read`). This floor sits above the config and below the engine: it imports neither.
"""
