"""Stage 3 of the sender: from a scored work directory to a signed payload.

- :mod:`.strategies`: the selection rules (lowest, safety-net, inverse, the controls);
- :mod:`.scored_work`: a work directory opened for selecting (leakage check included);
- :mod:`.payloads`: one selection written as a payload, with its summary;
- :mod:`.plan`: every candidate's predicted accuracy and size, and the choice;
- :mod:`.consensus`, :mod:`.contact_sheet`: the label filter and the picture.
"""
