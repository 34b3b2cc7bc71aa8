"""Image geometry with no learning in it: the pixel and flow conventions (:mod:`.grid`),
parametric warps (:mod:`.transforms`), ground-truth flow (:mod:`.gt_flow`), camera
intrinsics (:mod:`.camera`), and relative pose from dense flow (:mod:`.essential`,
:mod:`.essential_ransac`, :mod:`.pose`)."""
