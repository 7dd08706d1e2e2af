"""
spo.py: the clue stage of Vision-Zero, self-play policy optimisation (paper Sec. 3.2).

Every iteration plays a batch of full games (selfplay.py), scores each player's clues by how the
decision went, and trains the shared policy on the clue turns only:

  Eq. 1  clue rewards, zero-sum over the players (beta = lambda = 0.1, v = votes per seat):
           spy           r_s  = -beta (v_s - mean_civ v)
           civilian j    r_cj = (beta / n_c)(v_s - mean_civ v) - lambda (v_cj - mean_civ v)
         A player's reward applies to every clue turn it took in the game.
  Eq. 2  role advantage estimation (RAE): one baseline per role, starting at 0;
           A = r - b_role, THEN b_role <- alpha b_role + (1 - alpha) mean_batch(r_role), alpha = 0.95
         (the spy and the civilians face different odds; without RAE the paper's average drops
         below the base model). No std normalisation. Bias-corrected by default, like Eqs. 7-8:
         b_role is read as the raw EMA / (1 - alpha^t), t = updates so far (the first update
         sets it to the batch's role mean; the literal EMA still held a 0.95 share of its 0
         start after one update and 36% after 20); --no-rae-bias-correction is the literal EMA.
  Eq. 3  the clipped surrogate + k3 KL loss on the clue tokens: trainer.policy_loss.

Run it through Iterative-SPO (`bash run.sh`), or alone for the clue-only ablation:

    python spo.py --model tiny-vlm --data games/clevr --out runs/clue --schedule clue --iterations 20

It trains until trainer.py's switching rule hands over to the decision stage (rlvr.py) or the
iteration budget is spent, saves everything to --out, and exits.
"""


def clue_rewards(votes, spy, beta=0.1, lam=0.1):
    """Eq. 1: one reward per seat from the decision's votes (votes[k] = samples naming seat k)."""
    civilians = [k for k in range(len(votes)) if k != spy]
    mean_civ = sum(votes[k] for k in civilians) / len(civilians)
    spy_exposure = votes[spy] - mean_civ  # > 0: the spy drew more suspicion than an average civilian
    rewards = [0.0] * len(votes)
    rewards[spy] = -beta * spy_exposure
    for k in civilians:
        rewards[k] = beta / len(civilians) * spy_exposure - lam * (votes[k] - mean_civ)
    return rewards


def initial_baselines():
    """The RAE state of a fresh run: both role baselines' raw EMAs at 0, and no update yet."""
    return {"spy": 0.0, "civilian": 0.0, "updates": 0}


def baseline_values(baselines, alpha=0.95, bias_correction=True):
    """The baseline each role subtracts: the raw EMA divided by 1 - alpha^t after t updates (0
    before the first), so that from the first clue iteration on it means "recent mean reward"
    like the bias-corrected Eqs. 7-8; bias_correction=False is the literal EMA of Eq. 2."""
    scale = 1 - alpha ** baselines["updates"] if bias_correction else 1.0
    return {role: baselines[role] / scale if scale > 0 else 0.0 for role in ("spy", "civilian")}


def role_advantages(rewards, is_spy, baselines, alpha=0.95, update_first=False, bias_correction=True):
    """Eq. 2: advantages of a batch of players against their role's baseline, then the EMA update
    of `baselines` (initial_baselines(): raw EMAs and the update count) in place with the batch's
    mean reward per role. update_first=True reproduces the released code (update, then subtract)."""
    def update():
        for role, flag in (("spy", True), ("civilian", False)):
            role_rewards = [r for r, s in zip(rewards, is_spy) if s == flag]
            if role_rewards:
                baselines[role] = alpha * baselines[role] + (1 - alpha) * sum(role_rewards) / len(role_rewards)
        baselines["updates"] += 1

    if update_first:
        update()
    subtracted = baseline_values(baselines, alpha, bias_correction)
    advantages = [r - subtracted["spy" if s else "civilian"] for r, s in zip(rewards, is_spy)]
    if not update_first:
        update()
    return advantages


def score_clues(games, cfg):
    """Eq. 1 for every game of a batch: sets game.rewards (one per seat)."""
    for game in games:
        game.rewards = clue_rewards(game.votes(cfg.players), game.spy, cfg.beta, cfg.lam)


def clue_samples(games, baselines, cfg):
    """The clue stage's training batch: every clue turn with its player's role advantage (Eq. 2
    over all players of the batch, which updates `baselines`). Sets game.advantages."""
    rewards = [r for game in games for r in game.rewards]
    is_spy = [seat == game.spy for game in games for seat in range(cfg.players)]
    advantages = role_advantages(rewards, is_spy, baselines, cfg.rae_alpha, cfg.rae_update_first,
                                 cfg.rae_bias_correction)
    turns, turn_advantages = [], []
    for i, game in enumerate(games):
        game.advantages = advantages[i * cfg.players:(i + 1) * cfg.players]
        turns += game.clues
        turn_advantages += [game.advantages[t.seat] for t in game.clues]  # a player's reward covers all its turns
    return turns, turn_advantages


if __name__ == "__main__":
    import sys

    import rlvr
    import trainer
    trainer.main("clue", clue_stage=sys.modules[__name__], decision_stage=rlvr)
