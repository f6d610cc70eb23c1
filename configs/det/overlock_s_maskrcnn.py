# The default detection config: Mask R-CNN + OverLoCK-S, 1x schedule on COCO.
#   bash tools/dist_train.sh configs/det/overlock_s_maskrcnn.py 8
_base_ = ['./overlock_s_maskrcnn_1x.py']
