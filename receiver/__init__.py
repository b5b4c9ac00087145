"""The edge device: payloads judged in one acceptance order (:mod:`.acceptance`), trained
as jobs (:mod:`.job`), alone or by the daemon (:mod:`.daemon`: claims, intake,
quarantine, queue, ledger, frames, HTTP); :mod:`.commands` and :mod:`.cli` are
``plada-receive``."""
