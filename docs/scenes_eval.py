"""Every-face prediction on scenes of held-out real faces (dev_faces fold 0) and on real-mask mosaics."""
import sys, time, json
from pathlib import Path
import numpy as np, pandas as pd
from multitask import load_run
from multitask.data.faces import find_faces
from multitask.data.scenes import draw_scene, generate_mosaics, match_faces, BOX
from multitask.data.sources import load_source

RUN = Path(sys.argv[1]); OUT = Path(sys.argv[2]); OUT.mkdir(exist_ok=True)
model = load_run(RUN)
oof = pd.read_csv(RUN / "fold0" / "oof.csv")
held = set(oof["path"])
table = load_source("competition", Path("/work/shared/data/dev_faces"))[0]
table = table[table["path"].isin(held)].reset_index(drop=True)
found = find_faces(table["path"].tolist(), Path("/work/cache"), lambda s: None)
lab = pd.concat([table, found.drop(columns="path")], axis=1)
lab = lab[lab["found"]].reset_index(drop=True)
print("held-out photos", len(table), "with a found face", len(lab))
scen = OUT / "scenes"
if not (scen / "faces.csv").exists():
    (scen / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(60):
        rows += draw_scene(scen, s, np.random.default_rng([7, s]), (1280, 720), tuple(range(1, 21)), (24, 200), lab)
    from multitask.tasks import FACE_AGE_THRESHOLDS, cut
    t = pd.DataFrame(rows); t["age_group"] = cut(t["age"].to_numpy(), FACE_AGE_THRESHOLDS); t.to_csv(scen / "faces.csv", index=False)
truth = pd.read_csv(scen / "faces.csv")
paths = sorted(str(p.resolve()) for p in (scen / "images").glob("*.jpg"))
t0 = time.perf_counter(); rows = model.predict(paths, faces="all"); wall = time.perf_counter() - t0
print(f"scenes: {len(paths)} photos, {len(truth)} faces drawn, {len(rows)} rows in {wall:.1f} s; {model.seconds}")
rows.to_csv(OUT / "scene_rows.csv", index=False)
truth["match"] = -1
for name, t in truth.groupby("scene"):
    f = rows[rows["path"] == str((scen / name).resolve())]
    truth.loc[t.index, "match"] = match_faces(t, f).values
bands = [(24, 32), (32, 48), (48, 96), (96, 201)]
clear = (truth["covered"] <= 0.3) & (truth["in_frame"] >= 0.9)
single = model.predict(sorted(set(truth["portrait"])), faces="largest").set_index("path")
res = []
for lo, hi in bands:
    b = truth[(truth["width"] >= lo) & (truth["width"] < hi) & clear]
    m = b[b["match"] >= 0]
    r = {"band": f"{lo}-{hi - 1 if hi == 201 else hi} px", "faces": len(b), "recall": round(len(m) / max(1, len(b)), 3)}
    got = rows.loc[m["match"]]
    ok = got["face_status"].eq("predicted").to_numpy()
    alone = single.loc[m["portrait"]]
    for head, col in (("mask", "mask"), ("gender", "gender"), ("age", "age_group")):
        r[f"{head} scene"] = round(float((got[f"pred_{head}"].to_numpy()[ok] == m[col].to_numpy()[ok]).mean()), 3) if ok.any() else None
        r[f"{head} alone"] = round(float((alone[f"pred_{head}"].to_numpy()[ok] == m[col].to_numpy()[ok]).mean()), 3) if ok.any() else None
    res.append(r)
res.append({"band": "covered > 30% or cut by the frame", "faces": int((~clear).sum()), "recall": round(float((truth.loc[~clear, "match"] >= 0).mean()), 3)})
big = truth[(truth["width"] >= 32) & clear]
res.append({"band": ">= 32 px (clear)", "faces": len(big), "recall": round(float((big["match"] >= 0).mean()), 3)})
false = len(rows[rows["face_status"] != "no_face"]) - int((truth["match"] >= 0).sum())
print(pd.DataFrame(res).to_markdown(index=False)); print("detections matching no drawn face:", false)
json.dump(res, open(OUT / "scenes.json", "w"), indent=1)

# real-mask mosaics
crops = load_source("mask_folders", Path("/work/shared/data/real_masks"))[0]
mos = OUT / "mosaics"
if not (mos / "tiles.csv").exists():
    generate_mosaics(mos, crops["path"].tolist(), [32, 48, 64, 96, 128], seed=3)
tiles = pd.read_csv(mos / "tiles.csv")
mpaths = sorted(str(p.resolve()) for p in (mos / "images").glob("*.jpg"))
t0 = time.perf_counter(); mrows = model.predict(mpaths, faces="all"); mwall = time.perf_counter() - t0
alone = model.predict(tiles["photo"].tolist(), faces="largest")
alone.index = tiles.index
print(f"mosaics: {len(mpaths)} photos, {len(tiles)} crops, {mwall:.1f} s")
mrows = mrows[mrows["face_status"] != "no_face"]
cx, cy = (mrows["x0"] + mrows["x1"]) / 2, (mrows["y0"] + mrows["y1"]) / 2
out = []
for w, group in tiles.groupby("width"):
    found = same = classified = 0
    for i, t in group.iterrows():
        path = str((mos / t["mosaic"]).resolve())
        inside = mrows[(mrows["path"] == path) & (cx > t.x0) & (cx < t.x1) & (cy > t.y0) & (cy < t.y1)]
        if inside.empty:
            continue
        found += 1
        face = inside.loc[(inside["x1"] - inside["x0"]).idxmax()]
        if face["face_status"] == "predicted":
            classified += 1
            same += face["mask_class"] == alone.loc[i, "mask_class"]
    out.append({"crop width": f"{w} px", "crops": len(group), "face found": round(found / len(group), 3),
                "classified": classified, "same mask class as alone": round(same / max(1, classified), 3)})
print(pd.DataFrame(out).to_markdown(index=False))
json.dump(out, open(OUT / "mosaics.json", "w"), indent=1)
