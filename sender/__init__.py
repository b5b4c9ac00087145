"""The ground station, by stage: :mod:`.embedding` (the reference set embedded once and
indexed), :mod:`.scoring` (a teacher scores every reference image), :mod:`.selection`
(a payload from the scores, or the plan's choice), :mod:`.link` (frames for a lossy
link); :mod:`.commands` and :mod:`.cli` are ``plada-send``."""
