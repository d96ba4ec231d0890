"""Score a checkpoint on its dataset's test split (``fastcnn eval``)."""
from .checkpoint import load_checkpoint
from .config import validate
from .errors import CheckpointError, ConfigError


def model_from_checkpoint(checkpoint):
    """(config, model) rebuilt from a loaded checkpoint's meta and arrays."""
    from .model import build_model

    raw = checkpoint.meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{checkpoint.path}: no config in its meta; not a fastcnn training checkpoint")
    try:
        cfg = validate(raw)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint.path}: its saved config is invalid ({e})") from None
    model = build_model(cfg.model, seed=cfg.seed)
    try:
        model.load_state_dict(checkpoint.model)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.path}: {e}") from None
    return cfg, model


def evaluate_checkpoint(path, data_root=None, batch_size=500, threads=None):
    """Test-set metrics of a checkpoint: accuracy, loss, per-class accuracy, count, dataset, class names."""
    from .data import load_dataset
    from .train import evaluate, set_threads

    checkpoint = load_checkpoint(path)
    cfg, model = model_from_checkpoint(checkpoint)
    set_threads(threads)
    d = cfg.data
    ds = load_dataset(d.dataset, data_root if data_root is not None else d.root,
                      input_shape=tuple(cfg.model.input_shape), num_classes=cfg.model.num_classes,
                      num_train=d.num_train, num_test=d.num_test, seed=cfg.seed)
    result = evaluate(model, ds.x_test, ds.y_test, batch_size=batch_size)
    result.update({"dataset": ds.name, "checkpoint": str(path), "epoch": checkpoint.meta.get("epoch"),
                   "class_names": list(ds.class_names)})
    return result
