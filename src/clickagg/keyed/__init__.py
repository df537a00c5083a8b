"""The stream's keyed second stage: an internal log by IP (stage 1 appends), the keyed
rules over it and their corrections (stage 2). See ``clickagg.core.keyed``."""
