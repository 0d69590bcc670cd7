"""Configs: typed defaults, presets, key=value overrides; unknown keys and wrong types are errors."""
import re

import pytest

from multitask.config import CONFIG_DIR, ConfigError, final_stage, load_config, to_yaml


def test_defaults_are_the_face_task_with_two_stages():
    cfg = load_config()
    assert [h.name for h in cfg.heads] == ["mask", "gender", "age"]
    assert cfg.stages[0].heads == ["gender", "age"] and cfg.stages[0].only == {"mask": "not_worn"}
    assert cfg.stages[1].heads == [] and cfg.model.arch == "resnet18"
    assert cfg.optim.lr_trunk is None and cfg.optim.lr_heads is None  # chosen by whether weights were loaded


def test_overrides_reach_nested_fields_with_types():
    cfg = load_config(["model.arch=resnet34", "stage2.epochs=10", "data.size=[160,128]", "optim.lr_trunk=0.001"])
    assert cfg.model.arch == "resnet34" and cfg.stages[1].epochs == 10
    assert cfg.data.size == [160, 128] and cfg.optim.lr_trunk == pytest.approx(1e-3)


@pytest.mark.parametrize("override, message", [
    ("model.archh=resnet18", "archh"),
    ("nonsense=1", "nonsense"),
    ("stage2.epochs=many", "epochs"),
    ("optim.scheduler=linear", "optim.scheduler='linear': must be one of cosine, step, none"),
    ("stage1.heads=[gender,beard]", "unknown head(s) ['beard']"),
    ("data=nowhere", "no preset"),
    ("cv.folds=1", "cv.folds=1: must be >= 2"),
    ("justaword", "expected key=value"),
    ("stage1.epochs=0", "stage1.epochs=0: must be >= 1"),
    ("stage2.epochs=-2", "stage2.epochs=-2: must be >= 1"),
    ("data.batch_size=1", "data.batch_size=1: must be >= 2"),
    ("train.threads=-3", "train.threads=-3: must be >= 0"),
    ("optim.lr_heads=-1", "optim.lr_heads=-1.0: must be > 0"),
    ("data.size=[0,0]", "data.size=[0, 0]: two sizes of 8 to 4096 pixels"),
    ("augment.degrade=1.5", "augment.degrade=1.5: must be >= 0 and <= 1"),
    ("train.device=gpu", "train.device='gpu': must be auto, cpu, cuda or cuda:N"),
    ("stage1.size=[96,56]", "stage1.size=[96, 56]: at most data.size [72, 56]"),
    ("stage1.size=[4,4]", "stage1.size=[4, 4]: two sizes of 8 to 4096 pixels"),
    ("stage2.size=[48,40]", "stage2.size=[48, 40]: the final stage trains the run's model, at data.size"),
    ("stage1.only={beard: grey}", "stage1.only: unknown head(s) ['beard']"),
    ("stage1.photos_per_person=-1", "stage1.photos_per_person=-1: must be >= 0"),
    ("stage1.only=3", "override 'stage1.only=3': Cannot assign int"),
    ("data.size=[1,", "override 'data.size=[1,': "),
    ("heads.0.prior=real", "heads.0.prior='real': must be one of balanced, training"),
])
def test_bad_overrides_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([override])


def test_the_training_prior_needs_class_weights_to_take_out():
    assert load_config(["heads.0.prior=training"]).heads[0].prior == "training"
    with pytest.raises(ConfigError, match=re.escape("heads.2.prior=training takes out the class weights a ce head "
                                                    "learnt with, and heads.2.kind=dldl has none")):
        load_config(["heads.2.kind=dldl", "heads.2.prior=training"])
    with pytest.raises(ConfigError, match=re.escape("and loss.class_weights=false has none")):
        load_config(["loss.class_weights=false", "heads.0.prior=training"])


def test_a_preset_after_an_override_of_the_same_key_is_an_error_not_a_silent_undo():
    """Overrides apply in order; a preset that sets a key (or a list such as heads) would drop an earlier one."""
    cfg = load_config(["experiment=real_faces", "heads.2.kind=dldl"])
    assert [(h.kind, h.prior) for h in cfg.heads] == [("ce", "training"), ("ce", "balanced"), ("dldl", "balanced")]
    with pytest.raises(ConfigError, match=re.escape("experiment=real_faces: sets heads, which would undo the earlier "
                                                    "override 'heads.2.kind=dldl'; give the override after")):
        load_config(["heads.2.kind=dldl", "experiment=real_faces"])
    with pytest.raises(ConfigError, match=re.escape("sets data.face_crop, which would undo the earlier override "
                                                    "'data.face_crop=center'")):
        load_config(["data.face_crop=center", "experiment=real_masks"])
    assert load_config(["data.face_crop=center", "data=dev_faces"]).data.face_crop == "center"  # not set there


def test_a_mapping_in_an_override_or_a_file_replaces_the_mapping(tmp_path):
    assert load_config(["stage1.only={}"]).stages[0].only == {}  # stage 1 on every photo, masked or not
    assert load_config(["stage1.only={gender: female}"]).stages[0].only == {"gender": "female"}
    preset = tmp_path / "every_photo.yaml"
    preset.write_text("stage1:\n  only: {}\n  photos_per_person: 1\n")
    cfg = load_config([str(preset)])
    assert cfg.stages[0].only == {} and cfg.stages[0].photos_per_person == 1 and cfg.stages[0].heads == ["gender", "age"]


def test_presets_merge_into_their_section():
    cfg = load_config(["data=dev_faces"])
    assert cfg.data.source == "competition" and cfg.data.crop is None
    assert cfg.model.arch == "resnet18"  # other sections untouched


def test_every_preset_file_loads():
    presets = sorted(CONFIG_DIR.glob("*/*.yaml"))
    assert {f"{p.parent.name}={p.stem}" for p in presets} >= {"data=dev_faces", "experiment=quick",
                                                                "experiment=real_faces", "model=imagenet"}
    for path in presets:
        load_config([f"{path.parent.name}={path.stem}"])


def test_a_yaml_file_with_an_unknown_key_is_named(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="mine.yaml"):
        load_config([str(bad)])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["augment.mix=cutmix_vertical", "heads.2.train_thresholds=[30,58]", "stage1.only={}"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))  # a resumed run, predict and explain read this
    assert load_config(base=tmp_path / "c.yaml") == cfg


def test_stages_are_a_list_and_stage_n_names_entry_n_minus_1(tmp_path):
    three = tmp_path / "three.yaml"
    three.write_text("stages:\n  - {epochs: 2, heads: [gender, age], only: {mask: not_worn}}\n  - {epochs: 3}\n"
                     "  - {epochs: 1, heads: [mask]}\n")
    cfg = load_config([str(three), "stage3.epochs=4", "stage1.only={}"])
    assert [s.epochs for s in cfg.stages] == [2, 3, 4] and cfg.stages[2].heads == ["mask"]
    assert cfg.stages[0].only == {} and final_stage(cfg) == 3
    assert final_stage(load_config(["stage2.enabled=false"])) == 1
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(base=tmp_path / "c.yaml") == cfg  # what a run saves: the list


@pytest.mark.parametrize("overrides, message", [
    (["stage3.epochs=2"], "there are 2 stages (stage1 to stage2); to add one, give the whole stages list"),
    (["stage1.enabled=false", "stage2.enabled=false"], "stages: none enabled; nothing to train"),
    (["stage2.epochs=0"], "stage2.epochs=0: must be >= 1"),
    (["stage2.heads=[nose]"], "stage2.heads: unknown head(s) ['nose']"),
])
def test_a_wrong_stage_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides)
