// peftopt-generate: greedy generation from a GGUF with llama.cpp, for checking an exported model.
//
//   peftopt-generate -m model.gguf -n 32 [-t threads] [--add-special] < prompt.txt
//
// The prompt is read from stdin as text (special tokens like <|eot_id|> are parsed). Output is line based
// so that the caller can compare token ids with transformers exactly:
//   P <id> <id> ...        the prompt's token ids
//   G <id> <hex bytes>     one line per generated token, its piece as hex (safe for any bytes)
//   E eog|length           why generation stopped
#include "llama.h"

#include <cstdio>
#include <cstring>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static void batch_set_tokens(llama_batch_ext * batch, const llama_token * tokens, int32_t n_tokens, llama_pos pos_0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n_tokens; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n_tokens - 1, true);
}

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    std::string model_path;
    int n_predict = 32;
    int n_threads = 0;
    bool add_special = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) {
            model_path = argv[++i];
        } else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
            n_predict = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            n_threads = std::stoi(argv[++i]);
        } else if (!strcmp(argv[i], "--add-special")) {
            add_special = true;
        } else {
            fprintf(stderr, "usage: %s -m model.gguf [-n n_predict] [-t threads] [--add-special] < prompt\n", argv[0]);
            return 2;
        }
    }
    if (model_path.empty() || n_predict < 1) {
        fprintf(stderr, "error: -m model.gguf is required and -n must be positive\n");
        return 2;
    }
    std::string prompt((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), model_params);
    if (model == nullptr) {
        fprintf(stderr, "error: unable to load model %s\n", model_path.c_str());
        return 3;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), nullptr, 0, add_special, true);
    std::vector<llama_token> prompt_tokens(n_prompt);
    if (n_prompt <= 0 ||
        llama_tokenize(vocab, prompt.c_str(), prompt.size(), prompt_tokens.data(), prompt_tokens.size(), add_special, true) < 0) {
        fprintf(stderr, "error: failed to tokenize the prompt\n");
        return 3;
    }

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = n_prompt + n_predict;
    ctx_params.n_batch = n_prompt;
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
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    printf("P");
    for (auto id : prompt_tokens) {
        printf(" %d", id);
    }
    printf("\n");

    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    batch_set_tokens(batch, prompt_tokens.data(), n_prompt, 0);
    int n_tokens = n_prompt;
    const char * reason = "length";
    for (int n_pos = 0, n_out = 0; n_out < n_predict; n_out++) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "error: failed to evaluate\n");
            return 3;
        }
        n_pos += n_tokens;
        llama_token id = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, id)) {
            reason = "eog";
            break;
        }
        char buf[256];
        int n = llama_token_to_piece(vocab, id, buf, sizeof(buf), 0, false);
        if (n < 0) {
            fprintf(stderr, "error: failed to convert token %d to text\n", id);
            return 3;
        }
        printf("G %d ", id);
        for (int k = 0; k < n; k++) {
            printf("%02x", (unsigned char) buf[k]);
        }
        printf("\n");
        batch_set_tokens(batch, &id, 1, n_pos);
        n_tokens = 1;
    }
    printf("E %s\n", reason);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
