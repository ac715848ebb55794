"""nipype interfaces over volseg's library functions, and the ``init_volseg_wf`` factory.

Thin ``SimpleInterface``s in the niworkflows manner (``interfaces/nibabel.py::RegridToZooms``
over ``utils/images.py``): :class:`N4` (:func:`volseg.preprocess.prepare`), :class:`Strip`
(:func:`volseg.cohort.stages.strip_prepared`) and :class:`Anomaly`
(``volseg.anomaly.infer.anomaly_volume``). Outputs are written into the node's working folder
with the same names ``volseg run`` uses, on the input's grid.

Examples::

    from volseg.interfaces import init_volseg_wf

    wf = init_volseg_wf(stages=("n4", "strip"), omp_nthreads=2)
    wf.inputs.inputnode.in_file = "sub-01_T1w.nii.gz"
    wf.base_dir = "work"
    wf.run()
"""

from __future__ import annotations

import contextlib

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _opt(value, default=None):
    return value if isdefined(value) else default


@contextlib.contextmanager
def _threads(n):
    if isdefined(n) and n and n > 0:
        from volseg.cohort.run import thread_limits

        with thread_limits(int(n)):
            yield
    else:
        yield


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D T1-weighted head scan (NIfTI or MGH)")
    config = File(exists=True, desc="YAML settings in the configs/strip.yaml format")
    num_threads = traits.Int(0, usedefault=True, desc="CPU threads (0: the libraries' own)")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="N4-corrected image on the input's grid (_desc-preproc_T1w)")


class N4(SimpleInterface):
    """N4 bias-field correction on the input's own grid."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        from volseg.io import AtomicWriter, load_image, scan_id
        from volseg.io.derivatives import save_output, sidecar
        from volseg.preprocess import prepare
        from volseg.strip.config import load_strip_config

        cfg = load_strip_config(_opt(self.inputs.config))
        data, meta = load_image(self.inputs.in_file, nonfinite=cfg.preprocess.io.nonfinite)
        with _threads(self.inputs.num_threads):
            prep = prepare(data, meta, cfg.preprocess)
        with AtomicWriter() as w:
            out = save_output(w, runtime.cwd, "preproc", scan_id(self.inputs.in_file), prep.native, meta,
                              sidecar("preproc", meta, cfg.preprocess, N4=prep.grid_image.meta.get("volseg_n4", {})))
        self._results["out_file"] = str(out)
        return runtime


class _StripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the scan (its intensities go into out_brain)")
    n4_file = File(exists=True, desc="the N4-corrected scan (N4's out_file); without it, N4 runs here")
    config = File(exists=True, desc="YAML settings in the configs/strip.yaml format")
    strip_model = traits.Directory(exists=True, desc="strip model folder (default: the shipped model)")
    model_dir = traits.Directory(exists=True, desc="same as strip_model (kept for older workflows)")
    tta = traits.Bool(False, usedefault=True, desc="average with a left-right flipped prediction")
    border_mm = traits.Float(desc="grow (>0) or shrink (<0) the mask by this many mm")
    device = traits.Str("cpu", usedefault=True, desc="auto, cpu or cuda")
    num_threads = traits.Int(0, usedefault=True, desc="CPU threads (0: the libraries' own)")


class _StripOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask, uint8, input grid (_desc-brain_mask)")
    out_brain = File(exists=True, desc="input intensities inside the mask (_desc-brain_T1w)")
    brain_volume_ml = traits.Float(desc="brain mask volume in mL")


class Strip(SimpleInterface):
    """Skull stripping with the strip network; the mask on the input's own grid."""

    input_spec = _StripInputSpec
    output_spec = _StripOutputSpec

    def _run_interface(self, runtime):
        import dataclasses

        import numpy as np

        from volseg.cohort.stages import strip_prepared
        from volseg.device import pick_device
        from volseg.errors import InputError
        from volseg.io import AtomicWriter, load_image, scan_id
        from volseg.io.derivatives import save_output, sidecar
        from volseg.nets.folder import load_model
        from volseg.preprocess import prepare
        from volseg.strip.config import load_strip_config
        from volseg.strip.infer import for_model

        device = pick_device(self.inputs.device)
        net, info = load_model(_opt(self.inputs.strip_model, _opt(self.inputs.model_dir)), kind="strip",
                               device=device)
        cfg = for_model(load_strip_config(_opt(self.inputs.config)), net)
        data, meta = load_image(self.inputs.in_file, nonfinite=cfg.preprocess.io.nonfinite)
        pcfg, source = cfg.preprocess, data
        if isdefined(self.inputs.n4_file):  # already corrected: no second N4
            source, n4_meta = load_image(self.inputs.n4_file, nonfinite=cfg.preprocess.io.nonfinite)
            if n4_meta.shape != meta.shape or not np.allclose(n4_meta.affine, meta.affine, atol=1e-4):
                raise InputError(self.inputs.n4_file, f"is not on the grid of {self.inputs.in_file}")
            pcfg = dataclasses.replace(pcfg, n4=dataclasses.replace(pcfg.n4, backend="none"))
        with _threads(self.inputs.num_threads):
            prep = prepare(source, meta, pcfg)
            mask = strip_prepared(prep, net, cfg, device, self.inputs.tta, _opt(self.inputs.border_mm))
        if not mask.any():
            raise InputError(self.inputs.in_file, "no brain found (the predicted mask is empty)")
        sid = scan_id(self.inputs.in_file)
        vol = float(mask.sum()) * float(np.prod(meta.zooms)) / 1000.0
        model = {"sha256": info.get("sha256"), "net": info.get("net")}
        with AtomicWriter() as w:
            out_mask = save_output(w, runtime.cwd, "mask", sid, mask, meta,
                                   sidecar("mask", meta, cfg.preprocess, Model=model, BrainVolume_mL=round(vol, 2)))
            out_brain = save_output(w, runtime.cwd, "brain", sid, np.where(mask > 0, data, 0), meta,
                                    sidecar("brain", meta, cfg.preprocess, Model=model))
        self._results.update(out_mask=str(out_mask), out_brain=str(out_brain), brain_volume_ml=vol)
        return runtime


class _AnomalyInputSpec(BaseInterfaceInputSpec):
    n4_file = File(exists=True, mandatory=True, desc="N4-corrected scan (N4's out_file)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid (Strip's out_mask)")
    anomaly_model = traits.Directory(exists=True, desc="anomaly model folder (default: the shipped model)")
    device = traits.Str("cpu", usedefault=True, desc="auto, cpu or cuda")
    num_threads = traits.Int(0, usedefault=True, desc="CPU threads (0: the libraries' own)")


class _AnomalyOutputSpec(TraitedSpec):
    out_map = File(exists=True, desc="voxel-wise anomaly map (_desc-anomaly_map)")
    out_mask = File(exists=True, desc="anomaly mask (_label-anomaly_mask)")
    score = traits.Float(desc="scan anomaly score")
    flag = traits.Bool(desc="whether the scan is flagged as anomalous")


class Anomaly(SimpleInterface):
    """The anomaly map and score of an N4-corrected scan inside its brain mask."""

    input_spec = _AnomalyInputSpec
    output_spec = _AnomalyOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from volseg.cohort.stages import StageError, anomaly_available
        from volseg.device import pick_device
        from volseg.io import AtomicWriter, load_image, scan_id
        from volseg.io.derivatives import save_output, sidecar

        device = pick_device(self.inputs.device)
        _, fn, model = anomaly_available(device, _opt(self.inputs.anomaly_model))
        if fn is None:
            raise StageError(f"the anomaly stage is not available: {model}")
        data, meta = load_image(self.inputs.n4_file)
        mask, _ = load_image(self.inputs.mask_file)
        with _threads(self.inputs.num_threads):
            res = fn(data, (mask > 0).astype(np.uint8), meta, model, cfg=None, n4=False)
        sid = scan_id(self.inputs.n4_file).removesuffix("_desc-preproc")
        common = dict(res.info, Timings=res.timings)
        with AtomicWriter() as w:
            out_map = save_output(w, runtime.cwd, "anomaly_map", sid, res.map, meta,
                                  sidecar("anomaly_map", meta, model.cfg.preprocess, [self.inputs.mask_file], **common))
            out_mask = save_output(w, runtime.cwd, "anomaly_mask", sid, res.mask, meta,
                                   sidecar("anomaly_mask", meta, model.cfg.preprocess, **common))
        self._results.update(out_map=str(out_map), out_mask=str(out_mask), score=float(res.score),
                             flag=bool(res.flag))
        return runtime


def init_volseg_wf(name: str = "volseg_wf", omp_nthreads: int = 1, mem_gb: float = 3.0,
                   stages=None, config=None, strip_model=None, anomaly_model=None, device: str = "cpu",
                   model_dir=None):
    """A nipype workflow ``inputnode.in_file`` -> N4 -> Strip -> Anomaly -> ``outputnode``.

    ``stages``: a subset of ``("n4", "strip", "anomaly")``; None takes all that are available
    (the anomaly stage is left out with a warning when its model is missing). Each node uses
    ``omp_nthreads`` threads and declares ``mem_gb`` for nipype's resource scheduler.
    ``outputnode`` fields: ``preproc``, ``mask``, ``brain``, ``brain_volume_ml``, ``anomaly_map``, ``anomaly_mask``,
    ``anomaly_score``, ``anomaly_flag`` (those of stages not run stay undefined).
    ``strip_model``/``anomaly_model``: model folders (default: the shipped models; ``model_dir``
    is the older name of ``strip_model``).
    """
    import logging

    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from volseg.cohort.stages import ALL_STAGES, StageError, anomaly_available

    if stages is None:
        stages = ALL_STAGES
        reason = anomaly_available(device, anomaly_model)[2]
        if not hasattr(reason, "net"):
            logging.getLogger("volseg").warning("init_volseg_wf: anomaly stage left out (%s)", reason)
            stages = ("n4", "strip")
    stages = tuple(stages)
    unknown = set(stages) - set(ALL_STAGES)
    if unknown or not stages:
        raise StageError(f"init_volseg_wf: stages must be a subset of {ALL_STAGES}, got {stages}")
    if "anomaly" in stages and not {"n4", "strip"} <= set(stages):
        raise StageError("init_volseg_wf: the anomaly stage needs the n4 and strip stages")

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["preproc", "mask", "brain", "brain_volume_ml", "anomaly_map",
                                                   "anomaly_mask", "anomaly_score", "anomaly_flag"]),
                         name="outputnode")
    common = dict(n_procs=omp_nthreads, mem_gb=mem_gb)
    cfg = {"config": str(config)} if config else {}
    n4 = strip = None
    if "n4" in stages:
        n4 = pe.Node(N4(num_threads=omp_nthreads, **cfg), name="n4", **common)
        wf.connect([(inputnode, n4, [("in_file", "in_file")]),
                    (n4, outputnode, [("out_file", "preproc")])])
    if "strip" in stages:
        strip_model = strip_model or model_dir
        extra = {"strip_model": str(strip_model)} if strip_model else {}
        strip = pe.Node(Strip(num_threads=omp_nthreads, device=device, **cfg, **extra),
                        name="strip", **common)
        wf.connect([(inputnode, strip, [("in_file", "in_file")]),
                    (strip, outputnode, [("out_mask", "mask"), ("out_brain", "brain"),
                                         ("brain_volume_ml", "brain_volume_ml")])])
        if n4 is not None:
            wf.connect(n4, "out_file", strip, "n4_file")
    if "anomaly" in stages:
        extra = {"anomaly_model": str(anomaly_model)} if anomaly_model else {}
        anomaly = pe.Node(Anomaly(num_threads=omp_nthreads, device=device, **extra), name="anomaly", **common)
        wf.connect([(n4, anomaly, [("out_file", "n4_file")]),
                    (strip, anomaly, [("out_mask", "mask_file")]),
                    (anomaly, outputnode, [("out_map", "anomaly_map"), ("out_mask", "anomaly_mask"),
                                           ("score", "anomaly_score"), ("flag", "anomaly_flag")])])
    return wf


__all__ = ["N4", "Strip", "Anomaly", "init_volseg_wf"]
