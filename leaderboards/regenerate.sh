#!/usr/bin/env bash
# Regenerate one published leaderboard from scratch: bash leaderboards/regenerate.sh BOARD
#   BOARD = omniglot | omniglot-semi | omniglot-shapes | omniglot-metric-transfer | fashion-mnist-ssl | fashion-mnist-ssl-trained | cifar10-ssl | cifar10-ssl-trained | site | all
# These are the commands that produced the committed tables (CPU, OMP_NUM_THREADS=1, one
# command per core). Results go to runs/ (resumable: rerunning skips stored tasks), backbones
# to checkpoints/, pages to leaderboards/. Needs FSBENCH_DATA (../shared/data on the project's
# machines) and Debian's dataset-fashion-mnist for Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
CK=checkpoints
W="--workdir ${RUNS:-runs}"  # RUNS=DIR keeps a round of boards in a store of its own
# the 24 000-episode shape table and the large-pool protocol keep stores of their own
WS="--workdir ${RUNS:-runs}-shapes" WM="--workdir ${RUNS:-runs}-mt"
mkdir -p "$CK"

ce_backbone() {  # Conv-4, cross-entropy on Lake's background alphabets (disjoint from the Vinyals test split)
  [ -f "$CK/conv4-ce-omniglot-bg.pt" ] || fsbench pretrain --dataset omniglot --split background \
    --arch conv4 --objective ce --steps 1500 --image-size 28 --out "$CK/conv4-ce-omniglot-bg.pt"
}

omniglot() {
  ce_backbone
  local feat=(-m nearest-prototype -m nn-propagation -m spectral-propagation -m diffusion)
  fsbench run omniglot-5w1s -m protonet:steps=3000,lr_decay_every=1000 $W
  fsbench run omniglot-20w1s -m protonet:steps=3000,lr_decay_every=1000 $W
  for p in omniglot-5w5s omniglot-20w5s; do
    fsbench run $p -m protonet:train_shot=5,steps=2000,lr_decay_every=700 $W
  done
  fsbench run omniglot-5w1s -m maml:meta_batch=16,steps=400 $W
  for p in omniglot-5w1s omniglot-5w5s omniglot-20w1s omniglot-20w5s; do
    fsbench run $p "${feat[@]}" "${PEERS[@]}" --backbone "checkpoint:$CK/conv4-ce-omniglot-bg.pt" \
      --max-tasks 600 $W
  done
  fsbench leaderboard omniglot-5w1s omniglot-5w5s omniglot-20w1s omniglot-20w5s --name omniglot $W
}

omniglot_semi() {
  ce_backbone
  local init="$CK/protonet-omniglot-1shot.pt"
  fsbench run omniglot-semi-5w1s -m protonet:steps=3000,lr_decay_every=1000 --save-state "$init" $W
  fsbench run omniglot-semi-5w1s \
    -m "soft-kmeans:init=$init,steps=0" -m "soft-kmeans-cluster:init=$init,steps=0" \
    -m "masked-soft-kmeans:init=$init,steps=0" $W
  fsbench run omniglot-semi-5w1s -m nearest-prototype -m nn-propagation -m spectral-propagation \
    -m diffusion -m propagation-classifier:propagator=nn -m diffusion-logreg "${PEERS[@]}" \
    --backbone "checkpoint:$CK/conv4-ce-omniglot-bg.pt" --max-tasks 600 $W
  fsbench leaderboard omniglot-semi-5w1s $W
}

fmnist_backbone() {  # Conv-4, instance discrimination on the 60 000 training images, labels unused
  [ -f "$CK/conv4-instance-fmnist.pt" ] || fsbench pretrain --dataset fashion-mnist --split train \
    --arch conv4 --objective instance --steps 2000 --augment strong --image-size 28 \
    --out "$CK/conv4-instance-fmnist.pt"
}

fashion_mnist_ssl() {  # feature methods, 5 seeds (~25 min after the backbone)
  fmnist_backbone
  local inst="$CK/conv4-instance-fmnist.pt" seeds=(--seeds 0 1 2 3 4)
  fsbench run fashion-mnist-ssl -m nearest-prototype -m logistic-regression -m nn-propagation \
    -m spectral-propagation -m propagation-classifier -m diffusion "${seeds[@]}" $W
  fsbench run fashion-mnist-ssl -m nearest-prototype -m logistic-regression -m nn-propagation \
    -m spectral-propagation -m propagation-classifier -m diffusion \
    --backbone "checkpoint:$inst#embed" "${seeds[@]}" $W
  fsbench leaderboard fashion-mnist-ssl $W
}

fashion_mnist_ssl_trained() {  # image-trained networks, seed 0 (28 trainings, CPU time)
  fmnist_backbone
  local inst="$CK/conv4-instance-fmnist.pt"
  fsbench run fashion-mnist-ssl -m supervised -m "finetune:init=$inst" \
    -m "propagation-finetune:init=$inst" -m mean-teacher --seeds 0 $W
  fsbench leaderboard fashion-mnist-ssl $W
}

cifar_backbone() {  # Conv-4, instance discrimination on the 50 000 training images (JPEG copy), labels unused
  [ -f "$CK/conv4-instance-cifar10.pt" ] || fsbench pretrain --dataset cifar10 --split train \
    --arch conv4 --objective instance --steps 3000 --augment strong --image-size 32 \
    --out "$CK/conv4-instance-cifar10.pt"
}

cifar10_ssl() {  # feature methods on the instance backbone, 5 seeds
  cifar_backbone
  fsbench run cifar10-ssl -m nearest-prototype -m logistic-regression -m nn-propagation \
    -m spectral-propagation -m propagation-classifier -m diffusion \
    --backbone "checkpoint:$CK/conv4-instance-cifar10.pt#embed" --seeds 0 1 2 3 4 $W
  fsbench leaderboard cifar10-ssl $W
}

cifar10_ssl_trained() {  # image-trained networks, seed 0 only at three budgets (CPU time)
  cifar_backbone
  local inst="$CK/conv4-instance-cifar10.pt"
  for n in 250 1000 4000; do
    fsbench run "cifar10-ssl-$n" -m supervised -m "finetune:init=$inst" \
      -m "propagation-finetune:init=$inst" -m mean-teacher --seeds 0 $W
  done
  fsbench leaderboard cifar10-ssl $W
}

PEERS=(-m simpleshot -m bd-cspn -m laplacianshot -m tim -m pt-map -m tpn -m ilpc)

omniglot_shapes() {  # 40 episode shapes, 600 episodes each; graph methods, their published-default
  # form (k=10, equal class masses, no support check) and the transductive peers, all paired
  ce_backbone
  local ck="checkpoint:$CK/conv4-ce-omniglot-bg.pt"
  fsbench run omniglot-shapes -m nearest-prototype -m diffusion -m spectral-propagation \
    -m diffusion:k=10,prior=none,support_check=false -m spectral-propagation:k=10,support_check=false \
    --backbone "$ck" $WS
  fsbench run omniglot-shapes "${PEERS[@]}" --backbone "$ck" $WS
  fsbench leaderboard omniglot-shapes $WS --out leaderboards/omniglot-shapes
}

omniglot_metric_transfer() {  # every episode's pool: the unlabeled 60% of all 1692 test classes
  ce_backbone
  # spectral-propagation (~6 s per task on this pool) and the dense-graph tpn / ilpc (refused
  # beyond 5000 items) are left out; the other peers ignore the pool
  fsbench run omniglot-metric-transfer -m nearest-prototype -m nn-propagation -m diffusion \
    -m simpleshot -m bd-cspn -m laplacianshot -m tim -m pt-map \
    --backbone "checkpoint:$CK/conv4-ce-omniglot-bg.pt" $WM
  fsbench leaderboard omniglot-metric-transfer $WM --out leaderboards/omniglot-metric-transfer
}

site() {  # the HTML site of every board, the shape and large-pool stores included when present
  local also=() store
  for store in "${RUNS:-runs}-shapes" "${RUNS:-runs}-mt"; do
    [ -f "$store/results.sqlite" ] && also+=(--also-workdir "$store")
  done
  fsbench leaderboard --all --html leaderboards/site $W "${also[@]}"
  # the README's picture of the site (Debian: apt-get install chromium)
  chromium --headless=new --no-sandbox --disable-gpu --window-size=1200,1500 \
    --screenshot=leaderboards/site-screenshot.png "file://$PWD/leaderboards/site/fashion-mnist-ssl.html"
}

case "${1:-}" in
  omniglot) omniglot ;;
  omniglot-semi) omniglot_semi ;;
  omniglot-shapes) omniglot_shapes ;;
  omniglot-metric-transfer) omniglot_metric_transfer ;;
  fashion-mnist-ssl) fashion_mnist_ssl ;;
  fashion-mnist-ssl-trained) fashion_mnist_ssl_trained ;;
  cifar10-ssl) cifar10_ssl ;;
  cifar10-ssl-trained) cifar10_ssl_trained ;;
  site) site ;;
  all) omniglot; omniglot_semi; omniglot_shapes; omniglot_metric_transfer; fashion_mnist_ssl; fashion_mnist_ssl_trained; cifar10_ssl; cifar10_ssl_trained; fsbench leaderboard --all $W; site ;;
  *) echo "usage: bash leaderboards/regenerate.sh omniglot|omniglot-semi|omniglot-shapes|omniglot-metric-transfer|fashion-mnist-ssl|fashion-mnist-ssl-trained|cifar10-ssl|cifar10-ssl-trained|site|all" >&2; exit 2 ;;
esac
