"""Stage 4 of the sender: a payload cut into fountain-coded frames for a narrow, lossy
link (:mod:`.frames`), or sent for ever by the carousel until the device replies
(:mod:`.carousel`)."""
