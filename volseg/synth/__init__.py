"""Synthetic T1-weighted heads (scalp, skull, eyes, face, neck) with brain and lesion masks.

Built from nilearn's offline MNI152 2009 template; used for tests, the demo cohort and to
train skull stripping. Importing this package is cheap: numpy only.
"""

from volseg.synth.cohort import cohort_seed, generate_cohort, write_subject
from volseg.synth.heads import SynthSubject, synth_head

__all__ = ["SynthSubject", "cohort_seed", "generate_cohort", "synth_head", "write_subject"]
