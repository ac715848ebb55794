"""Synthetic T1-weighted heads (scalp, skull, eyes, face, neck) with brain and lesion masks.

Built from nilearn's offline MNI152 2009 template; used for tests, the demo cohort and to
train skull stripping. Importing this package is cheap: numpy only.
"""

from volseg.synth.heads import SynthSubject, generate_cohort, synth_head, write_subject

__all__ = ["SynthSubject", "generate_cohort", "synth_head", "write_subject"]
