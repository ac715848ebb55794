"""``volseg review``: people check a run's scans in a local web app (a real 3D viewer, NiiVue),
rate them, and the ratings feed back into calibration and training.

:mod:`volseg.review.ratings` is the ratings table; :mod:`volseg.review.feedback` turns rated scans
into healthy controls and training pairs; :mod:`volseg.review.server` is the local web server.
"""
