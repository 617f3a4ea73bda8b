"""Region shards (docs/regions.md): ``cclm prep coco-regions`` (:mod:`data_prep.regions.coco`) and ``cclm prep
vg-regions`` (:mod:`data_prep.regions.vg`), on what they share (:mod:`data_prep.regions.common`)."""
