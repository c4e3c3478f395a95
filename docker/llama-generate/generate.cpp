// peftopt-generate: greedy generation from a GGUF with llama.cpp, for checking and evaluating an exported
// model. Several prompts are decoded together, one sequence each, in one batch per step.
//
//   peftopt-generate -m model.gguf -n 32 [-t threads] [-ngl gpu_layers] [--add-special] [--prompts K] < prompts
//
// Without --prompts, all of stdin is one prompt. With --prompts K, stdin holds K prompts, each written as a
// line with its length in bytes, then that many bytes. Prompts are text (special tokens like <|eot_id|> are
// parsed). Output is line based, each line tagged with the prompt's index, so that the caller can compare
// token ids with transformers exactly:
//   P <k> <id> <id> ...    prompt k's token ids
//   G <k> <id> <hex>       one line per generated token, its piece as hex (safe for any bytes)
//   E <k> eog|length       why prompt k's generation stopped
#include "llama.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static bool read_prompts(int count, std::vector<std::string> & prompts) {
    if (count == 0) {
        prompts.emplace_back((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
        return true;
    }
    for (int k = 0; k < count; k++) {
        std::string header;
        if (!std::getline(std::cin, header)) {
            return false;
        }
        const size_t size = std::stoul(header);
        std::string text(size, '\0');
        if (size > 0 && !std::cin.read(&text[0], size)) {
            return false;
        }
        prompts.push_back(text);
    }
    return true;
}

int main(int argc, char ** argv) {
    std::string model_path;
    int n_predict = 32;
    int n_threads = 0;
    int n_prompts = 0;
    int n_gpu_layers = 0;
    bool add_special = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) {
            model_path = argv[++i];
        } else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
            n_predict = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            n_threads = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "--prompts") && i + 1 < argc) {
            n_prompts = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "-ngl") && i + 1 < argc) {
            n_gpu_layers = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "--add-special")) {
            add_special = true;
        } else {
            fprintf(stderr, "usage: %s -m model.gguf [-n n_predict] [-t threads] [-ngl gpu_layers] [--add-special] [--prompts K] < prompts\n", argv[0]);
            return 2;
        }
    }
    if (model_path.empty() || n_predict < 1 || n_prompts < 0) {
        fprintf(stderr, "error: -m model.gguf is required, -n must be positive and --prompts not negative\n");
        return 2;
    }
    std::vector<std::string> prompts;
    if (!read_prompts(n_prompts, prompts)) {
        fprintf(stderr, "error: stdin holds fewer than %d length-prefixed prompts\n", n_prompts);
        return 2;
    }
    const int n_seq = (int) prompts.size();

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = n_gpu_layers;  // 0 unless the CUDA build is asked to offload
    llama_model * model = llama_model_load_from_file(model_path.c_str(), model_params);
    if (model == nullptr) {
        fprintf(stderr, "error: unable to load model %s\n", model_path.c_str());
        return 3;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::vector<std::vector<llama_token>> tokens(n_seq);
    size_t longest = 0, total = 0;
    for (int k = 0; k < n_seq; k++) {
        const std::string & text = prompts[k];
        const int n = -llama_tokenize(vocab, text.c_str(), text.size(), nullptr, 0, add_special, true);
        tokens[k].resize(n);
        if (n <= 0 || llama_tokenize(vocab, text.c_str(), text.size(), tokens[k].data(), n, add_special, true) < 0) {
            fprintf(stderr, "error: failed to tokenize prompt %d\n", k);
            return 3;
        }
        longest = std::max(longest, (size_t) n);
        total += n;
    }

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_seq_max = n_seq;
    ctx_params.n_ctx = n_seq * (longest + n_predict);  // each sequence its own share of the cache
    ctx_params.n_batch = std::max(total, (size_t) n_seq);
    if (n_threads > 0) {
        ctx_params.n_threads = n_threads;
        ctx_params.n_threads_batch = n_threads;
    }
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (ctx == nullptr) {
        fprintf(stderr, "error: failed to create the llama_context\n");
        return 3;
    }
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());  // stateless: one serves every sequence

    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    std::vector<int32_t> logits_at(n_seq);
    std::vector<llama_pos> n_past(n_seq);
    for (int k = 0; k < n_seq; k++) {
        printf("P %d", k);
        for (llama_pos i = 0; i < (llama_pos) tokens[k].size(); i++) {
            printf(" %d", tokens[k][i]);
            logits_at[k] = llama_batch_ext_add_token(batch, k, tokens[k][i]);
            llama_batch_ext_set_pos(batch, logits_at[k], &i);
        }
        printf("\n");
        llama_batch_ext_set_output_logits(batch, logits_at[k], true);
        n_past[k] = tokens[k].size();
    }

    std::vector<int> n_out(n_seq, 0);
    std::vector<bool> active(n_seq, true);
    int n_active = n_seq;
    while (n_active > 0) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "error: failed to evaluate\n");
            return 3;
        }
        std::vector<llama_token> next(n_seq, -1);
        for (int k = 0; k < n_seq; k++) {
            if (!active[k]) {
                continue;
            }
            const llama_token id = llama_sampler_sample(smpl, ctx, logits_at[k]);
            if (llama_vocab_is_eog(vocab, id)) {
                printf("E %d eog\n", k);
                active[k] = false;
                n_active--;
                continue;
            }
            char buf[256];
            const int n = llama_token_to_piece(vocab, id, buf, sizeof(buf), 0, false);
            if (n < 0) {
                fprintf(stderr, "error: failed to convert token %d to text\n", id);
                return 3;
            }
            printf("G %d %d ", k, id);
            for (int b = 0; b < n; b++) {
                printf("%02x", (unsigned char) buf[b]);
            }
            printf("\n");
            if (++n_out[k] == n_predict) {
                printf("E %d length\n", k);
                active[k] = false;
                n_active--;
                continue;
            }
            next[k] = id;
        }
        llama_batch_ext_clear(batch);
        for (int k = 0; k < n_seq; k++) {
            if (active[k]) {
                logits_at[k] = llama_batch_ext_add_token(batch, k, next[k]);
                llama_batch_ext_set_pos(batch, logits_at[k], &n_past[k]);
                llama_batch_ext_set_output_logits(batch, logits_at[k], true);
                n_past[k]++;
            }
        }
        fflush(stdout);
    }
    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
