#!/usr/bin/env bash
# The GPU results, one part per call of a lent GPU machine, everything that comes back under $OUT:
#     bash tools/gpu_part.sh 1          # run there from the repository root, .data carried (below)
#     PROFILE=smoke OUT=/tmp/o bash tools/gpu_part.sh 1    # its rehearsal on a CPU at tiny sizes
# Parts (gallery parts, --profile gpu: each script's defaults):
#   1  tools.benchmark (plain, --compile, and one profiled training step), then ddpm
#   2  cfg (cross-attention), classifier_guidance, controlnet, cfg_input (the label as input maps)
#   3  latent, rf_pixel, rf_latent, deepcache_ddim, deepcache_rf
#   4  dit on CIFAR-10, then ddpm_cifar if time is left
# Parts 2 and 3 train the ddpm base first (ddpm_figures.py, the ddpm recipe) when the machine has none.
# Data, in the git-ignored .data/ named in `carry`: MNIST/ for parts 1-3 (cp -r ../shared/data/MNIST .data/);
# for part 4 only cifar10-jpg/train.zip and a test.zip of 500 images per class (the whole test.zip with the tree
# would pass the 64 MiB a call carries; the lesson page says the test half was scored):
#   unzip -q ../shared/data/cifar10-jpg/test.zip -d /tmp/t && cd /tmp/t && for c in test/*; do ls $c | sort |
#   tail -n +501 | sed "s|^|$c/|" | xargs rm; done && zip -qr test.zip test
# Back under $OUT: versions.txt, log.txt and results.tar.gz (docs/results.md, docs/gallery/PROFILE_*, the
# benchmark's output and profile under runs/bench/): `tar xzf results.tar.gz` in the checkout, then commit.
# DEADLINE (seconds, default 540) interrupts what still runs then; the parts already done are kept.
set -uo pipefail
part=${1:?which part: 1, 2, 3 or 4}
profile=${PROFILE:-gpu}
out=${OUT:-runs/gpu_out}
deadline=$((SECONDS + ${DEADLINE:-540}))
export PYTHONUNBUFFERED=1
mkdir -p "$out" runs/bench

left() { echo $((deadline - SECONDS > 5 ? deadline - SECONDS : 5)); }
run() { echo "+ $*"; timeout -s INT "$(left)" "$@"; }
gallery() { run python3 -m tools.gallery --profile "$profile" --data-dir .data --no-download --cifar .data/cifar10 \
            --only "$@"; }
recipe() { python3 -c "from tools.gallery import RECIPES; print(' '.join(RECIPES['$profile']['$1']))"; }
base() {   # the ddpm part's network, trained as that part trains it, when it is not here yet
  [ -f "runs/gallery/$profile/ddpm/ckpt.pt" ] || run python3 -m tools.ddpm_figures $(recipe ddpm) --data-dir .data \
      --no-download --out "runs/gallery/$profile/ddpm"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, torchvision, torchmetrics, cv2, matplotlib; print('torch', torch.__version__,
  'torchvision', torchvision.__version__, 'torchmetrics', torchmetrics.__version__, 'opencv', cv2.__version__,
  'matplotlib', matplotlib.__version__, 'cuda', torch.cuda.is_available())"; } > "$out/versions.txt" 2>&1

{ cat "$out/versions.txt"
  case $part in
    1) bench=(${BENCH:-})       # the rehearsal passes tiny sizes here
       run python3 -m tools.benchmark "${bench[@]}" --trace runs/bench/trace_plain.txt | tee runs/bench/plain.txt
       run python3 -m tools.benchmark "${bench[@]}" --compile | tee runs/bench/compile.txt
       gallery ddpm ;;
    2) base
       gallery cfg classifier_guidance controlnet cfg_input ;;
    3) base
       gallery latent rf_pixel rf_latent deepcache_ddim deepcache_rf ;;
    4) for z in .data/cifar10-jpg/*.zip; do python3 -m zipfile -e "$z" .data/cifar10; done
       gallery dit
       gallery ddpm_cifar ;;
    *) echo "no part '$part': 1, 2, 3 or 4" ;;
  esac
} 2>&1 | tee "$out/log.txt"

tar czf "$out/results.tar.gz" docs/results.md $(ls docs/gallery/"$profile"_* docs/gallery/results_"$profile".json \
    runs/bench/* 2>/dev/null)
ls -la "$out"
