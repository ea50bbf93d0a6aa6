"""MovieLens latest-small written as a new team's own tables (`train.prepare tables`'s format), for the held-out
try of docs/COLD_START.md: one recommendation domain under a name no pretrained run has (`movies`), every rating
of 4 or more a click (implicit feedback, timestamps kept), each user's last click the test list and the one
before it the validation list, each list that click among 99 movies the user never rated; train: the other
clicks, each with 4 movies the user never rated as non-clicks. Seeded; no sr_jax import (a user's own script).

    python docs/cold_start/movielens-tables/make_tables.py --src ../shared/data/movielens-latest-small --out T
"""

import argparse
import csv
from pathlib import Path

import numpy as np

TRAIN_NEGATIVES, LIST_SIZE = 4, 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=False)  # a new folder: nothing of anyone else's is overwritten
    rng = np.random.default_rng(args.seed)
    with open(src / "movies.csv", newline="", encoding="utf-8") as f:
        movies = {r["movieId"]: r for r in csv.DictReader(f)}
    clicks, rated = {}, {}
    with open(src / "ratings.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rated.setdefault(r["userId"], set()).add(r["movieId"])
            if float(r["rating"]) >= 4.0:
                clicks.setdefault(r["userId"], []).append((int(r["timestamp"]), r["movieId"]))
    catalogue = np.array(sorted(movies))

    def unseen(user: str, n: int) -> list[str]:
        drawn: list[str] = []
        while len(drawn) < n:
            for m in rng.choice(catalogue, size=2 * n):
                if m not in rated[user] and m not in drawn and len(drawn) < n:
                    drawn.append(str(m))
        return drawn

    rows = []
    for user in sorted(clicks, key=int):
        events = sorted(clicks[user])
        if len(events) < 3:  # a user needs a train click besides the two held out
            continue
        for split, (ts, movie) in [("test", events[-1]), ("valid", events[-2])]:
            rows.append((split, user, movie, 1, ts))
            rows += [(split, user, m, 0, ts) for m in unseen(user, LIST_SIZE - 1)]
        for ts, movie in events[:-2]:
            rows.append(("train", user, movie, 1, ts))
            rows += [("train", user, m, 0, ts) for m in unseen(user, TRAIN_NEGATIVES)]
    with open(out / "impressions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "domain", "user_id", "item_id", "label", "timestamp"])
        w.writerows((s, "movies", u, i, y, t) for s, u, i, y, t in rows)
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "text", "item.genres"])
        for m, r in movies.items():
            w.writerow([m, f"{r['title']}. {r['genres'].replace('|', ', ')}", r["genres"]])
    with open(out / "domains.csv", "w", newline="", encoding="utf-8") as f:
        f.write("name,task\nmovies,rec\n")
    counts = {s: sum(r[0] == s for r in rows) for s in ("train", "valid", "test")}
    print(f"{out}: {counts} impressions, {len(movies)} movies")


if __name__ == "__main__":
    main()
